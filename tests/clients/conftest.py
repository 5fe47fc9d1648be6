"""One real ``loraplex serve`` process for the client tests: a tiny random Llama, API keys, no GPU.

The server runs with ``--max-num-seqs 1 --max-queue 0``: a second generation request while one runs
is refused with 429 (``Retry-After: 1``), which is how the retry tests see the client back off.
Other tests run their requests one at a time and read every stream to its end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loraplex_client import Client

from adapters.tenants import add_key
from tests.api.conftest import MAX_MODEL_LEN
from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

BASE_MODEL = "tiny"
ADAPTER = "pirate"  # uploaded once by the `adapter` fixture, into the user's tenant
USER_TENANT = "acme"
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Hello there"}]


@dataclass(frozen=True)
class Deployment:
    """The running server, its keys (by role) and the adapter directories the tests upload."""

    server: Server
    keys: dict[str, str]  # "user" (tenant acme), "admin" (tenant ops)
    adapter_dir: Path  # a valid peft adapter (rank 8, q/v)
    other_adapter_dir: Path  # another valid one (different weights)
    bad_adapter_dir: Path  # the first with use_dora=true: refused with 422

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, role: str = "user", **kwargs) -> Client:
        return Client(self.url, self.keys[role], **kwargs)


def _adapters(root: Path, model_dir: Path) -> tuple[Path, Path, Path]:
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    good = save_peft_adapter(model_dir, root / "adapter", seed=5, **kwargs)
    other = save_peft_adapter(model_dir, root / "other-adapter", seed=6, **kwargs)
    bad = Path(shutil.copytree(good, root / "bad-adapter"))
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return good, other, bad


def _serve_args(root: Path, model_dir: Path, keys_file: Path) -> list[str]:
    return [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--keys-file", str(keys_file), "--max-lora-rank", "16", "--max-num-seqs", "1", "--max-queue", "0",
        "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="package")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("client")
    model_dir = write_tiny_llama(root / "model", max_position_embeddings=MAX_MODEL_LEN)
    keys_file = root / "keys.json"
    keys = {"user": add_key(keys_file, USER_TENANT, "user"), "admin": add_key(keys_file, "ops", "admin")}
    with running_server(_serve_args(root, model_dir, keys_file), root / "server.log") as server:
        yield Deployment(server, keys, *_adapters(root, model_dir))


@pytest.fixture(scope="package")
def client(deployment: Deployment) -> Iterator[Client]:
    """A client with the user key (tenant acme)."""
    with deployment.client() as http:
        yield http


@pytest.fixture(scope="package")
def adapter(deployment: Deployment, client: Client) -> str:
    """``ADAPTER``, uploaded once (without a progress bar) into the user's tenant."""
    client.upload(ADAPTER, deployment.adapter_dir, progress=False)
    return ADAPTER
