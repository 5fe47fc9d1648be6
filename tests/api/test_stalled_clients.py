"""Clients that stall or pile up, against a real ``loraplex serve`` process over raw sockets.

One server with ``--request-timeout 1 --max-connections 6``: headers that never finish (sent at
once or trickled a byte at a time), a body that stops, and more connections than the cap. Each
stalled client gets an OpenAI-style 408 and is closed; other clients are served meanwhile.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from tests.api.conftest import BASE_MODEL
from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import start_server
from tests.api.server_process import stop as _stop
from tests.engine.tiny import write_tiny_llama

TIMEOUT_S, MAX_CONNECTIONS = 1, 6
SHORT = {"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("impatient")
    model = write_tiny_llama(root / "model")
    args = [
        "--model", str(model), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--dtype", "float32", "--device", "cpu",
        "--request-timeout", str(TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
    ]  # fmt: skip
    server = start_server(args, root / "server.log")
    try:
        yield server
    finally:
        _stop(server.process)


def connect(server: Server) -> socket.socket:
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes)."""
    sock.settimeout(limit_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit_s} s; got {b''.join(chunks)[:200]!r}")
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_openai_error(raw: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = parse_response(raw)
    assert got == status, raw[:300]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return headers


def served(server: Server) -> bool:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return client.post("/v1/completions", json=SHORT).status_code == 200


def test_headers_that_never_finish_get_408_and_others_are_served(impatient):
    sock = connect(impatient)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    assert served(impatient), "a normal client is served while the stalled one waits"
    assert_openai_error(read_until_closed(sock), 408, "request_timeout")
    sock.close()


def test_a_header_trickle_cannot_stretch_the_deadline(impatient):
    """One byte every 0.1 s keeps the connection busy but never finishes the headers: the deadline
    counts from the first byte, so the server answers long before the trickle would end."""
    sock = connect(impatient)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started, answered = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - started < 8 * TIMEOUT_S:
        try:
            sock.sendall(b"a")
            answered = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if answered:
            break
    assert answered, f"the trickle ran {8 * TIMEOUT_S} s without an answer"
    assert_openai_error(answered + read_until_closed(sock), 408, "request_timeout")
    sock.close()


def test_a_body_that_stops_gets_408(impatient):
    sock = connect(impatient)
    body = json.dumps(SHORT).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body) + 100}\r\n\r\n".encode()
        + body
    )  # 100 bytes short, then silence
    assert_openai_error(read_until_closed(sock), 408, "request_timeout")
    sock.close()
    assert served(impatient)


def test_connections_beyond_the_cap_get_503_and_the_cap_frees_up(impatient):
    idle = [connect(impatient) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        extra = connect(impatient)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        headers = assert_openai_error(read_until_closed(extra), 503, "too_many_connections")
        assert headers["retry-after"] == "1"
        extra.close()
        for sock in idle:  # idle connections hit the header deadline: 408, closed, place freed
            assert_openai_error(read_until_closed(sock), 408, "request_timeout")
    finally:
        for sock in idle:
            sock.close()
    assert served(impatient)
