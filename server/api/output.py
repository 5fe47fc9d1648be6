"""From engine token deltas to OpenAI bodies: whole responses, and SSE streams of chunks.

One ``Formatter`` per endpoint knows that endpoint's shapes; ``collect`` and ``sse_events`` drive
the engine stream (the async generator ``Engine.submit`` returns) and are shared. Whatever way a
response ends (finished, client gone, server error), the engine stream is closed, which aborts a
request that is still running. An optional ``GenerationObserver`` (``server.metrics`` has one)
sees every delta as the response path consumes it, for latency metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api import schemas
from server.api.errors import ApiError
from server.engine.views import TokenDelta

log = logging.getLogger(__name__)
_MIN_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry
_DONE = "data: [DONE]\n\n"


class GenerationObserver(Protocol):
    """Timing hooks of one generation, called on the event loop by ``collect`` / ``sse_events``."""

    def on_delta(self, delta: TokenDelta) -> None:
        """A delta reached the response path (streamed: just before its chunk is sent)."""

    def on_end(self) -> None:
        """The response path let go of the stream, however it ended; called once, after every delta."""


class ClientDisconnected(Exception):
    """The client went away before a non-streaming response was ready."""


@dataclass
class Generation:
    """Everything a request produced so far, accumulated delta by delta."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # per token: where the text it released starts
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None

    def add(self, delta: TokenDelta) -> None:
        self.text_offsets.extend([len(self.text)] * len(delta.token_ids))
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason
        self.prompt_tokens, self.completion_tokens = delta.num_prompt_tokens, delta.num_output_tokens
        self.error, self.error_code = delta.error, delta.error_code

    @property
    def failed(self) -> bool:
        return self.finish_reason in ("abort", "error")

    def usage(self) -> schemas.Usage:
        total = self.prompt_tokens + self.completion_tokens
        return schemas.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, total_tokens=total
        )

    @staticmethod
    def total_usage(choices: list[Generation]) -> schemas.Usage:
        """The prompt counted once, the completions of every choice added up."""
        prompt = choices[0].prompt_tokens if choices else 0
        completion = sum(g.completion_tokens for g in choices)
        return schemas.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def failure(self) -> ApiError:
        """The error a generation that ended with abort/error is reported as."""
        if self.finish_reason == "abort":
            return ApiError(503, "The request was aborted before it finished.", type="server_error",
                            code="request_aborted")  # fmt: skip
        status = 503 if self.error_code in ("draining", "store_unavailable") else 500  # both: retry later
        return ApiError(status, self.error or "The generation failed.", type="server_error",
                        code=self.error_code or "internal_error")  # fmt: skip


def _logprob(value: float | None) -> float:
    return _MIN_LOGPROB if value is None or not math.isfinite(value) else max(value, _MIN_LOGPROB)


class Formatter:
    """The OpenAI shapes of one endpoint; ``piece`` is the part of a Generation one chunk carries."""

    def __init__(self, request_id: str, model: str, tokenizer: Any, logprobs: bool) -> None:
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.want_logprobs = logprobs
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def first_chunk(self, num_choices: int = 1) -> dict | None:
        return None

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        """One streamed chunk of choice ``index``; ``base_offset``: characters of it sent before."""
        raise NotImplementedError

    def usage_chunk(self, choices: list[Generation]) -> dict:
        raise NotImplementedError

    def response(self, choices: list[Generation]) -> dict:
        """The whole body: one choice per generation, in order, and the usage of them all."""
        raise NotImplementedError


class CompletionFormatter(Formatter):
    """``text_completion`` bodies; logprobs in the legacy shape (chosen token only)."""

    def _logprobs(self, gen: Generation, base_offset: int = 0) -> schemas.CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        return schemas.CompletionLogprobs(
            tokens=[self.token_text(t) for t in gen.token_ids],
            token_logprobs=[_logprob(v) for v in gen.logprobs],
            text_offset=[base_offset + offset for offset in gen.text_offsets],
        )

    def _body(self, choices: list[schemas.CompletionChoice], usage: schemas.Usage | None) -> dict:
        return schemas.CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump()

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        logprobs = self._logprobs(piece, base_offset)
        choice = schemas.CompletionChoice(
            index=index, text=piece.text, logprobs=logprobs, finish_reason=piece.finish_reason
        )
        return self._body([choice], None)

    def usage_chunk(self, choices: list[Generation]) -> dict:
        return self._body([], Generation.total_usage(choices))

    def response(self, choices: list[Generation]) -> dict:
        body = [
            schemas.CompletionChoice(
                index=i, text=g.text, logprobs=self._logprobs(g), finish_reason=g.finish_reason
            )
            for i, g in enumerate(choices)
        ]
        return self._body(body, Generation.total_usage(choices))


class ChatFormatter(Formatter):
    """``chat.completion`` bodies and ``chat.completion.chunk`` deltas (the first carries the role)."""

    def _logprobs(self, gen: Generation) -> schemas.ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        content = []
        for token_id, value in zip(gen.token_ids, gen.logprobs, strict=True):
            text = self.token_text(token_id)
            content.append(
                schemas.TokenLogprob(token=text, logprob=_logprob(value), bytes=list(text.encode()))
            )
        return schemas.ChatLogprobs(content=content)

    def _chunk(self, choices: list[schemas.ChatChunkChoice], usage: schemas.Usage | None = None) -> dict:
        return schemas.ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump()

    def first_chunk(self, num_choices: int = 1) -> dict:
        delta = schemas.ChatDelta(role="assistant", content="")
        return self._chunk([schemas.ChatChunkChoice(index=i, delta=delta) for i in range(num_choices)])

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        delta = schemas.ChatDelta(content=piece.text or None)
        choice = schemas.ChatChunkChoice(
            index=index, delta=delta, logprobs=self._logprobs(piece), finish_reason=piece.finish_reason
        )
        return self._chunk([choice])

    def usage_chunk(self, choices: list[Generation]) -> dict:
        return self._chunk([], Generation.total_usage(choices))

    def response(self, choices: list[Generation]) -> dict:
        body = [
            schemas.ChatChoice(
                index=i, message=schemas.AssistantMessage(content=g.text), logprobs=self._logprobs(g),
                finish_reason=g.finish_reason,
            )
            for i, g in enumerate(choices)
        ]  # fmt: skip
        return schemas.ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=body,
            usage=Generation.total_usage(choices),
        ).model_dump()  # fmt: skip


# ---- non-streaming ----
async def collect(
    stream: AsyncGenerator[tuple[int, TokenDelta], None], request: Request,
    observer: GenerationObserver | None = None, num_choices: int = 1,
) -> list[Generation]:  # fmt: skip
    """Every choice's deltas (``stream`` yields (choice index, delta), see ``merge_streams``);
    raises ClientDisconnected (after aborting) if the client goes first."""
    generation = [Generation() for _ in range(num_choices)]

    async def consume() -> None:
        async for index, delta in stream:
            generation[index].add(delta)
            if observer is not None:
                observer.on_delta(delta)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            raise ClientDisconnected
        consumer.result()  # re-raise what the consumer raised, if anything
        return generation
    finally:
        for task in (consumer, watcher):
            task.cancel()  # a consumer cancelled mid-stream closes the stream, which aborts the request
        await asyncio.gather(consumer, watcher, return_exceptions=True)
        await stream.aclose()
        if observer is not None:
            observer.on_end()


async def merge_streams(streams: list) -> AsyncGenerator[tuple[int, TokenDelta], None]:
    """(choice index, delta) from several engine streams as they come; closing it closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, delta = await queue.get()
            if delta is None:
                remaining -= 1
            else:
                yield index, delta
        for task in tasks:
            task.result()  # re-raise what a pump raised
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- streaming ----
def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(
    stream: AsyncGenerator[tuple[int, TokenDelta], None],
    formatter: Formatter,
    include_usage: bool,
    observer: GenerationObserver | None = None,
    num_choices: int = 1,
) -> AsyncGenerator[str, None]:
    """``data: {chunk}`` events, one per delta with news, the last with finish_reason, then (when
    ``include_usage``) a usage-only chunk, then ``data: [DONE]``. A generation that fails sends an
    error event (OpenAI error body) instead of the rest, then ``[DONE]``."""
    try:
        try:
            async for event in _chunks(stream, formatter, include_usage, observer, num_choices):
                yield _sse(event)
        except Exception:
            log.exception("streaming response %s failed", formatter.request_id)
            yield _sse(ApiError(500, "The server had an error while streaming.", type="server_error",
                                code="internal_error").body())  # fmt: skip
        yield _DONE
    finally:
        await stream.aclose()  # aborts the request if it is still running (client went away)
        if observer is not None:
            observer.on_end()


async def _chunks(
    stream: AsyncIterator[tuple[int, TokenDelta]], formatter: Formatter, include_usage: bool,
    observer: GenerationObserver | None, num_choices: int,
) -> AsyncIterator[dict]:  # fmt: skip
    totals = [Generation() for _ in range(num_choices)]
    if (first := formatter.first_chunk(num_choices)) is not None:
        yield first
    async for index, delta in stream:
        if observer is not None:
            observer.on_delta(delta)
        piece, total = Generation(), totals[index]
        piece.add(delta)
        base_offset = len(total.text)
        total.add(delta)
        if total.failed:
            yield total.failure().body()
            return
        if delta.text or delta.finish_reason or (formatter.want_logprobs and delta.token_ids):
            yield formatter.chunk(piece, base_offset, index)
    if include_usage:
        yield formatter.usage_chunk(totals)


class EventStreamResponse(StreamingResponse):
    """An SSE response that, however it ends, closes its body and then calls ``on_close``.

    Starlette stops iterating the body when the client disconnects but may leave the generator
    suspended; closing it here runs its cleanup (closing the engine stream) right away.
    ``on_close`` covers a body that never started.
    """

    def __init__(self, body: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()
            finally:
                self._on_close()
