"""A real ``loraplex serve`` process (uvicorn) on a tiny random Llama plus one preloaded peft adapter."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
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
