"""Retries: 429 from a full server (Retry-After honoured), connection failures (backoff), and what is
never retried (a stream after its first byte); plus the stream and upload wire formats.

The server admits one running request and queues none, so a stream held open makes every other
generation request a 429 with ``Retry-After: 1``. Clients get a ``sleep`` that records the delays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from loraplex_client import AsyncClient, Client, ConnectionError, RateLimitError, RetryPolicy, ServerError
from loraplex_client.streaming import SSEDecoder
from loraplex_client.types import CompletionChunk

from tests.api.server_process import free_port
from tests.clients.conftest import BASE_MODEL, Deployment

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}  # seconds of work on the tiny model
CHUNK = b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"text":"hi"}]}\n\n'


def _counting_client(deployment: Deployment, attempts: list[str], **kwargs) -> Client:
    http = httpx.Client(event_hooks={"request": [lambda request: attempts.append(request.url.path)]})
    return deployment.client(http_client=http, **kwargs)


def test_rate_limited_request_is_retried_then_raises(deployment: Deployment, client: Client) -> None:
    attempts: list[str] = []
    delays: list[float] = []
    probe = _counting_client(deployment, attempts, max_retries=3, sleep=delays.append)
    with client.completions(BASE_MODEL, "Hold", stream=True, **LONG) as held:
        chunks = iter(held)  # keep the generator: dropping it would close the stream
        next(chunks)
        with pytest.raises(RateLimitError) as info:
            probe.completions(BASE_MODEL, "Hello", max_tokens=1)
    assert attempts == ["/v1/completions"] * 4
    assert delays == [1.0, 1.0, 1.0]  # the server's Retry-After, not the backoff
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (429, "queue_full", 1.0)


def test_rate_limited_request_succeeds_once_capacity_frees(deployment: Deployment, client: Client) -> None:
    held = client.completions(BASE_MODEL, "Hold", stream=True, **LONG)
    chunks = iter(held)
    next(chunks)
    delays: list[float] = []

    def sleep(delay_s: float) -> None:
        delays.append(delay_s)
        held.close()  # the server aborts the held request, freeing its place
        time.sleep(delay_s)

    with deployment.client(max_retries=5, sleep=sleep) as probe:
        assert probe.completions(BASE_MODEL, "Hello", max_tokens=2).usage.completion_tokens >= 1
    assert delays and set(delays) == {1.0}


def test_async_client_honours_retry_after(deployment: Deployment, client: Client) -> None:
    delays: list[float] = []

    async def record(delay_s: float) -> None:
        delays.append(delay_s)

    async def probe() -> None:
        key = deployment.keys["user"]
        async with AsyncClient(deployment.url, key, max_retries=2, sleep=record) as aclient:
            await aclient.chat(BASE_MODEL, [{"role": "user", "content": "Hi"}], max_tokens=1)

    with client.completions(BASE_MODEL, "Hold", stream=True, **LONG) as held:
        chunks = iter(held)
        next(chunks)
        with pytest.raises(RateLimitError):
            asyncio.run(probe())
    assert delays == [1.0, 1.0]


def test_connection_failures_are_retried_with_exponential_backoff() -> None:
    delays: list[float] = []
    client = Client(f"http://127.0.0.1:{free_port()}", max_retries=2, sleep=delays.append)
    with client, pytest.raises(ConnectionError):
        client.models()
    assert len(delays) == 2
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0  # 0.5 s · 2^attempt, jitter ×[0.5, 1]
    assert RetryPolicy(max_retries=9).backoff_s(20) <= 8.0


# ---- wire formats, on a mock transport ----
class _BreaksAfterOneChunk(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield CHUNK
        raise httpx.ReadError("connection reset")


def _mock_client(handler, **kwargs) -> Client:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return Client("http://loraplex.test", "key", http_client=http, sleep=lambda s: None, **kwargs)


def test_a_stream_is_never_retried_after_its_first_byte() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=_BreaksAfterOneChunk())

    chunks = _mock_client(handler).completions("m", "p", stream=True)
    first = next(iter_chunks := iter(chunks))
    assert isinstance(first, CompletionChunk) and first.text == "hi"
    with pytest.raises(ConnectionError):
        next(iter_chunks)
    assert calls == [1]


def test_an_error_event_ends_the_stream_with_a_typed_error() -> None:
    body = CHUNK + b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    body += b"data: [DONE]\n\n"
    client = _mock_client(lambda request: httpx.Response(200, content=body))
    stream = iter(client.completions("m", "p", stream=True))
    assert next(stream).text == "hi"
    with pytest.raises(ServerError, match="boom") as info:
        next(stream)
    assert info.value.status is None and info.value.type == "server_error"


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "event: message", "data: {", "data:  1}", "", "data: [DONE]", ""]
    assert [e for e in map(decoder.feed, lines) if e is not None] == ["{\n 1}", "[DONE]"]


def test_an_upload_is_retried_from_the_start(deployment: Deployment) -> None:
    bodies: list[bytes] = []
    declared: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        declared.append(int(request.headers["content-length"]))
        if len(bodies) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "busy"}})
        return httpx.Response(201, json={"error": {"message": "not an adapter"}})

    with pytest.raises(Exception, match="validation error"):  # the 201 body is not an Adapter
        _mock_client(handler).upload("name", deployment.adapter_dir, progress=False)
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert declared == [len(bodies[0])] * 2
    assert b'name="name"\r\n\r\nname\r\n' in bodies[0]
    assert b'name="files"; filename="adapter_model.safetensors"' in bodies[0]
