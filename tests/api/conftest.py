"""A real ``loraplex serve`` process (uvicorn) on a tiny random Llama plus one preloaded peft adapter."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

BASE_MODEL = "tiny"  # --served-model-name
ADAPTER = "tiny-lora"
MAX_MODEL_LEN = 2048  # long enough that an unaborted 1500-token request would take seconds


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server, started once per session and stopped at its end.

    One running sequence at a time (``--max-num-seqs 1``): a request that was not aborted would
    hold up the next one, which is how the disconnect tests see an abort from outside.
    """
    root = tmp_path_factory.mktemp("api")
    model_dir = write_tiny_llama(root / "model", max_position_embeddings=MAX_MODEL_LEN)
    adapter_dir = save_peft_adapter(
        model_dir, root / "adapter", seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    args = [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--adapter", f"{ADAPTER}={adapter_dir}",
        "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--max-num-seqs", "1", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    with running_server(args, root / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


STRUCTURED_BASE, STRUCTURED_ADAPTER = "tiny-base", "lora-qv"


@pytest.fixture(scope="session")
def structured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server of the structured-output and tools tests: a tiny random Llama (it knows no JSON,
    so whatever parses does because of the grammar) with an adapter, 8 sequences at a time, a
    context long enough for a tools prompt in byte tokens."""
    root = tmp_path_factory.mktemp("structured")
    model_dir = write_tiny_llama(root / "model", max_position_embeddings=2048)
    adapter = save_peft_adapter(model_dir, root / STRUCTURED_ADAPTER, seed=21, r=8, lora_alpha=16,
                                target_modules=["q_proj", "v_proj"])  # fmt: skip
    args = [
        "--model", str(model_dir), "--served-model-name", STRUCTURED_BASE, "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--max-num-seqs", "8", "--dtype", "float32", "--device", "cpu",
        "--adapter", f"{STRUCTURED_ADAPTER}={adapter}",
    ]  # fmt: skip
    with running_server(args, root / "server.log") as running:
        yield running


@pytest.fixture(scope="session")
def structured_client(structured_server: Server) -> Iterator[openai.OpenAI]:
    url = f"{structured_server.url}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as oai:
        yield oai
