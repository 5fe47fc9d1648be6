"""A real ``loraplex serve`` process (uvicorn) on a tiny random Llama plus one preloaded peft adapter."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = "tiny"  # --served-model-name
ADAPTER = "tiny-lora"
MAX_MODEL_LEN = 2048  # long enough that an unaborted 1500-token request would take seconds
STARTUP_TIMEOUT_S = 90


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
    port = free_port()
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "--served-model-name", BASE_MODEL, "--adapter", f"{ADAPTER}={adapter_dir}",
        "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--max-num-seqs", "1", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["HF_HUB_OFFLINE"] = "1"
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
