"""Load limits and graceful shutdown of a real ``loraplex serve`` process.

One server with room for exactly one request (``--max-num-seqs 1 --max-queue 0``) shows the 429 and
413 limits and that a client who leaves gives its place back; two more, each stopped by SIGTERM,
show draining: what finishes in time finishes, what does not ends with an SSE error event.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import BASE_MODEL
from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import start_server
from tests.api.server_process import stop as _stop
from tests.engine.tiny import write_tiny_llama

GREEDY = {"temperature": 0, "ignore_eos": True}
SHORT = {"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 2}
MAX_BODY_BYTES = 16 * 1024**2  # server.api.limits.DEFAULT_MAX_BODY_BYTES
ERROR_KEYS = {"message", "type", "param", "code"}
ANY_CODE = object()
# A text prompt the byte-level tokenizer needs seconds for (~3 s on the 2-core CI machine).
SLOW_TO_TOKENIZE_PROMPT = "ab cd " * 170_000


def stream_request(max_tokens: int) -> dict:
    """A greedy streamed completion of exactly ``max_tokens`` tokens, with a final usage chunk."""
    return {
        "model": BASE_MODEL, "prompt": "x", "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, **GREEDY,
    }  # fmt: skip


def sse_data(response: httpx.Response) -> Iterator[dict | str]:
    """The data payloads of an SSE response as they arrive: parsed JSON, or "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def assert_openai_error(response: httpx.Response, status: int, code: object = ANY_CODE) -> dict:
    """``status`` with exactly ``{"error": {message, type, param, code}}``, and ``code`` unless ANY_CODE."""
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["message"]
    if code is not ANY_CODE:
        assert body["error"]["code"] == code, body
    return body["error"]


def assert_finished_normally(events: list[dict | str], max_tokens: int) -> None:
    """Chunks without errors, the last with finish_reason length, a usage chunk, then [DONE]."""
    assert events[-1] == "[DONE]", events[-3:]
    *chunks, usage = events[:-1]
    assert not [e for e in chunks if "error" in e], "a chunk was an error event"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == max_tokens


# Long enough that an unaborted request runs well past a 2 s drain timeout on a fast CPU (the tiny
# model decodes over 1,000 tokens/s alone).
LONG_CONTEXT = 8192


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("limits") / "model", max_position_embeddings=LONG_CONTEXT)


def launch(root: Path, model_dir: Path, *flags: str) -> Server:
    """Start ``loraplex serve`` on the tiny model with ``flags`` and wait until it is healthy."""
    args = [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--dtype", "float32", "--device", "cpu", *flags,
    ]  # fmt: skip
    return start_server(args, root / "server.log")


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """A server that runs one sequence and queues none: a second request in flight gets 429."""
    server = launch(tmp_path_factory.mktemp("one-slot"), model_dir, "--max-num-seqs", "1", "--max-queue", "0")
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture
def http(one_slot: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=one_slot.url, timeout=30) as client:
        yield client


# ---- 429 ----
def test_a_full_server_answers_429_with_retry_after_at_once_before_tokenizing(http):
    """While one request runs, new ones get 429 queue_full with Retry-After within a fraction of a
    second, even a prompt that would take seconds to tokenize and is too long anyway (so admission
    comes before tokenizing and validation), and the running stream is not disturbed."""
    max_tokens = 400
    with http.stream("POST", "/v1/completions", json=stream_request(max_tokens)) as running:
        events = sse_data(running)
        received = [next(events)]  # the first token: the request is running
        refused = [
            ("/v1/completions", SHORT),
            ("/v1/completions", {**SHORT, "prompt": SLOW_TO_TOKENIZE_PROMPT}),
            ("/v1/chat/completions", {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
            ("/v1/completions", {**SHORT, "model": "no-such-adapter"}),
        ]
        for path, body in refused:
            start = time.monotonic()
            response = http.post(path, json=body)
            elapsed = time.monotonic() - start
            error = assert_openai_error(response, 429, "queue_full")
            assert error["type"] == "rate_limit_error" and response.headers["retry-after"] == "1"
            assert elapsed < 0.5, f"{path}: the 429 took {elapsed:.2f}s"
        received += list(events)
    assert_finished_normally(received, max_tokens)
    assert http.post("/v1/completions", json=SHORT).status_code == 200, "the slot is free again"


BURST_SEQS, BURST_QUEUE, BURST_SIZE = 4, 4, 50


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """4 running and 4 waiting at most: 8 requests in flight."""
    flags = ("--max-num-seqs", str(BURST_SEQS), "--max-queue", str(BURST_QUEUE))
    server = launch(tmp_path_factory.mktemp("small-queue"), model_dir, *flags)
    try:
        yield server
    finally:
        _stop(server.process)


def test_a_burst_cannot_overrun_the_admission_limit(small_queue):
    """50 streamed requests sent at once (each longer than the burst takes to arrive): exactly
    max_num_seqs + max_queue get their stream, every other one a 429 queue_full with Retry-After;
    then the server serves normally again."""
    barrier = threading.Barrier(BURST_SIZE)
    outcomes: list[tuple[int, dict | None, str | None]] = []
    lock = threading.Lock()
    release = threading.Event()

    def one(i: int) -> None:
        with httpx.Client(base_url=small_queue.url, timeout=60) as client:
            barrier.wait()
            body = stream_request(LONG_CONTEXT - 16) | {"prompt": f"x{i}"}
            with client.stream("POST", "/v1/completions", json=body) as response:
                error = None
                if response.status_code != 200:
                    response.read()
                    error = response.json()
                with lock:
                    outcomes.append((response.status_code, error, response.headers.get("retry-after")))
                if response.status_code == 200:
                    # the stream started; hold it (and its reader: a reader collected early closes
                    # the connection) until all have answers
                    events = sse_data(response)
                    next(events)
                    release.wait(60)
                    events.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST_SIZE)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(outcomes) < BURST_SIZE and time.monotonic() < deadline:
        time.sleep(0.05)
    # On a loaded machine the burst can take longer than a request: each finished one frees a place.
    finished_at_most = _generated_tokens(small_queue.url) // (LONG_CONTEXT - 16)
    release.set()  # the admitted clients close their streams: their requests are aborted
    for thread in threads:
        thread.join(60)
    statuses = [status for status, _, _ in outcomes]
    assert len(statuses) == BURST_SIZE
    admitted = statuses.count(200)
    assert BURST_SEQS + BURST_QUEUE <= admitted <= BURST_SEQS + BURST_QUEUE + finished_at_most, sorted(
        statuses
    )
    assert statuses.count(429) == BURST_SIZE - admitted, sorted(statuses)
    for status, error, retry_after in outcomes:
        if status == 429:
            assert error["error"]["code"] == "queue_full" and error["error"]["type"] == "rate_limit_error"
            assert retry_after == "1"
    with httpx.Client(base_url=small_queue.url, timeout=30) as client:
        deadline = time.monotonic() + 30  # the aborted requests leave within a step or two
        while client.post("/v1/completions", json=SHORT).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.post("/v1/completions", json=SHORT).status_code == 200


def _generated_tokens(url: str) -> int:
    """The server's count of generated tokens so far (Prometheus ``/metrics``)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "loraplex_engine_generated_tokens":
            return int(sum(sample.value for sample in family.samples if sample.name.endswith("_total")))
    raise AssertionError("no loraplex_engine_generated_tokens in /metrics")


# ---- 413 ----
def _raw_http(port: int, head: bytes, timeout_s: float = 5) -> tuple[int, dict]:
    """Send ``head`` (request line + headers, no body) and read one response: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or pytest.fail(f"connection closed after {data!r}")
        header, _, body = data.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        length = next(
            int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"
        )
        while len(body) < length:
            body += sock.recv(65536) or pytest.fail("connection closed mid-body")
    return int(lines[0].split()[1]), json.loads(body)


def test_a_declared_oversized_body_is_refused_from_its_headers_alone(one_slot):
    """A Content-Length over 16 MiB gets its 413 before a single body byte is sent."""
    port = int(one_slot.url.rsplit(":", 1)[1])
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    )
    status, body = _raw_http(port, head)
    assert status == 413
    assert set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in body["error"]["message"]


def _chunked_body(num_bytes: int) -> Iterator[bytes]:
    """A completion body of about ``num_bytes`` sent as 1 MiB chunks (no Content-Length)."""
    yield b'{"model": "tiny", "prompt": "'
    for _ in range(num_bytes // 2**20):
        yield b"a" * 2**20
    yield b'"}'


def test_an_oversized_chunked_body_is_413(http):
    """Without a Content-Length the limit is enforced on the bytes as they arrive."""
    response = http.post(
        "/v1/completions",
        content=_chunked_body(MAX_BODY_BYTES + 2**20),
        headers={"content-type": "application/json"},
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    error = assert_openai_error(response, 413)
    assert str(MAX_BODY_BYTES) in error["message"]
    assert http.post("/v1/completions", json=SHORT).status_code == 200


def test_both_413s_carry_the_same_code(http):
    """Clients can tell an oversized body by its code however it was sent."""
    response = http.post(
        "/v1/completions",
        content=_chunked_body(MAX_BODY_BYTES + 2**20),
        headers={"content-type": "application/json"},
    )
    assert_openai_error(response, 413, "request_too_large")


def test_uploads_have_their_own_larger_limit(http):
    """The 16 MiB JSON limit does not apply to adapter uploads: a 17 MiB upload is judged on its
    content (422 invalid_adapter), not refused for its size."""
    files = [
        ("files", ("adapter_config.json", b"{}")),
        ("files", ("adapter_model.safetensors", b"\0" * (MAX_BODY_BYTES + 2**20))),
    ]
    response = http.post("/v1/adapters", data={"name": "big"}, files=files)
    assert_openai_error(response, 422, "invalid_adapter")


# ---- disconnects ----
def engine_gauges(http: httpx.Client) -> tuple[float, float]:
    """(running sequences, KV cache usage ratio) from /metrics."""
    values = {}
    for line in http.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("loraplex_scheduler_running_requests", "loraplex_kv_cache_usage_ratio"):
            values[name] = float(value)
    return values["loraplex_scheduler_running_requests"], values["loraplex_kv_cache_usage_ratio"]


def test_a_client_that_leaves_mid_stream_frees_its_kv_blocks_and_its_place_at_once(http):
    """With room for one request, closing a running stream frees its sequence and KV blocks within
    a fraction of a second, and lets the next request in (no 429) and finish promptly: the abort
    frees the admission count as well as the engine's sequence."""
    with http.stream("POST", "/v1/completions", json=stream_request(1500)) as response:
        events = sse_data(response)
        next(events), next(events)
        running, kv_usage = engine_gauges(http)
        assert running == 1 and kv_usage > 0
        assert http.post("/v1/completions", json=SHORT).status_code == 429
    closed = time.monotonic()
    while engine_gauges(http) != (0, 0):
        assert time.monotonic() - closed < 0.5, f"still running after 0.5 s: {engine_gauges(http)}"
        time.sleep(0.01)
    while (response := http.post("/v1/completions", json=SHORT)).status_code == 429:
        assert time.monotonic() - closed < 1.0, "the closed stream still holds its place after 1 s"
        time.sleep(0.02)
    assert response.status_code == 200, response.text
    assert time.monotonic() - closed < 1.5


def test_tokenizing_a_huge_prompt_does_not_stall_the_server(one_slot, http):
    """/health keeps answering while another request's long prompt is being tokenized."""
    slow = threading.Thread(
        target=httpx.post,
        args=(f"{one_slot.url}/v1/completions",),
        kwargs={"json": {**SHORT, "prompt": SLOW_TO_TOKENIZE_PROMPT}, "timeout": 60},
    )
    slow.start()
    try:
        time.sleep(0.3)  # the body is in; tokenizing it takes seconds
        start = time.monotonic()
        assert http.get("/health").status_code == 200
        assert time.monotonic() - start < 1.0, "/health was blocked behind tokenization"
    finally:
        slow.join()


# ---- SIGTERM ----
def wait_until_draining(http: httpx.Client, timeout_s: float) -> float:
    """Seconds until /ready says draining; fails after ``timeout_s``."""
    start = time.monotonic()
    while (ready := http.get("/ready")).status_code == 200:
        assert time.monotonic() - start < timeout_s, "/ready still 200"
        time.sleep(0.01)
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    return time.monotonic() - start


def test_sigterm_drains_then_ends_what_is_left_with_an_error_event(tmp_path, model_dir):
    """SIGTERM: /ready goes 503 at once while /health still answers; new requests get 503 draining;
    a stream still running when the 2 s drain timeout passes ends with an SSE error event and [DONE];
    then the process exits with status 0."""
    server = launch(tmp_path, model_dir, "--max-num-seqs", "1", "--drain-timeout", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=stream_request(LONG_CONTEXT - 8)) as running:
                events = sse_data(running)
                received = [next(events)]
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                assert wait_until_draining(http, timeout_s=2) < 0.5
                assert http.get("/health").json() == {"status": "ok"}
                refused = http.post("/v1/completions", json=SHORT)
                error = assert_openai_error(refused, 503, "draining")
                assert error["type"] == "server_error" and refused.headers["retry-after"] == "1"
                received += list(events)
                ended_after_s = time.monotonic() - signalled
            assert received[-1] == "[DONE]"
            error = received[-2]["error"]
            assert set(error) == ERROR_KEYS and error["type"] == "server_error"
            assert "shutting down" in error["message"] and error["code"] == "draining"
            assert all("error" not in e for e in received[:-2]), "only the last event is an error"
            assert len(received) > 3, "tokens were streamed before the drain timeout"
            assert 1.5 < ended_after_s < 6, f"the stream ended {ended_after_s:.1f}s after SIGTERM"
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sigterm_lets_a_request_that_finishes_in_time_finish_then_exits(tmp_path, model_dir):
    """A stream running when SIGTERM arrives, with a drain timeout long enough, ends normally
    (every token, finish_reason length, [DONE]) and the process then exits 0 without waiting out
    the timeout (600 s here, far beyond the 120 s the exit is waited for, so a drain that waits it
    out fails however loaded the machine is)."""
    server = launch(tmp_path, model_dir, "--max-num-seqs", "1", "--drain-timeout", "600")
    max_tokens = 300
    try:
        with (
            httpx.Client(base_url=server.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=stream_request(max_tokens)) as running,
        ):
            events = sse_data(running)
            received = [next(events)]
            server.process.send_signal(signal.SIGTERM)
            received += list(events)
        assert_finished_normally(received, max_tokens)
        assert server.process.wait(timeout=120) == 0, "the drain waited for nothing"
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sigterm_answers_an_upload_still_arriving_with_a_clean_503(tmp_path, model_dir):
    """An adapter upload whose body is still arriving when SIGTERM comes gets 503 draining (an
    OpenAI-style body, Retry-After) as soon as its next chunk arrives, never a 500; the log has no
    traceback and the process exits 0."""
    server = launch(tmp_path, model_dir, "--drain-timeout", "5")
    boundary = "loraplexboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nlate\r\n'
        f"--{boundary}\r\nContent-Disposition: form-data; "
        'name="files"; filename="adapter_model.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    total = len(head) + 4 * 65536
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + head
                + b"\0" * 65536
            )  # fmt: skip
            time.sleep(0.5)  # the server is reading the body
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"\0" * 65536)  # the next chunk arrives while the server drains
            sock.settimeout(10)
            raw = b""
            try:
                while chunk := sock.recv(65536):
                    raw += chunk
            except ConnectionResetError:
                pass
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line.split()[1] == b"503", raw[:300]
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"retry-after: 1" in headers.lower()
        error = json.loads(body)["error"]
        assert set(error) == ERROR_KEYS and error["code"] == "draining"
        assert server.process.wait(timeout=20) == 0
        log = server.log_tail(100_000)
        assert "Traceback" not in log and " 500 " not in log, log[-3000:]
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
