"""Start and stop a real ``loraplex serve`` process (uvicorn) for tests that speak HTTP to it.

``running_server(args, log_path)`` runs ``python -m server.cli serve --port <free port> *args`` from
the repository root with the ``LORAPLEX_*`` variables of the test environment removed and the hub
offline, waits until ``/ready`` answers 200, yields a :class:`ServerProcess`, and stops it with
SIGTERM (SIGKILL after 15 s). A server that exits or is not ready in time fails the test with the
tail of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90
STOP_TIMEOUT_S = 15


@dataclass(frozen=True)
class ServerProcess:
    url: str  # http://127.0.0.1:<port>, without a trailing slash
    process: subprocess.Popen
    log_path: Path  # the process's stdout and stderr

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    """A TCP port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(server: ServerProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``/ready`` until it answers 200; pytest.fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout_s:.0f}s:\n{server.log_tail()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains, then exits); SIGKILL if it is still there after STOP_TIMEOUT_S."""
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_server(args: Sequence[str], log_path: Path, extra_env: Mapping[str, str] | None = None,
                 subcommand: str = "serve",
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:  # fmt: skip
    """``loraplex serve *args`` on a free loopback port, returned once ready; the caller ``stop``s it.
    ``extra_env`` is added to the process's environment (e.g. ``AWS_ENDPOINT_URL``); ``subcommand``
    may be ``serve-ray``."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "server.cli",
        subcommand,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra_env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server, startup_timeout_s)
    except BaseException:
        stop(process)
        raise
    return server


@contextmanager
def running_server(args: Sequence[str], log_path: Path, extra_env: Mapping[str, str] | None = None,
                   **options: object) -> Iterator[ServerProcess]:  # fmt: skip
    """``start_server`` for the duration of a ``with`` block, stopped after it."""
    server = start_server(args, log_path, extra_env, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop(server.process)
