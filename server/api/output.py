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
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api import schemas
from server.api.convert import Echo
from server.api.errors import ApiError
from server.api.logprobs import ScoredTokens, TokenTexts, chat_logprobs, completion_logprobs
from server.api.tool_calls import ReadOut, ToolCallReader
from server.api.tools import ToolPlan
from server.engine.sampler import TopLogprobs
from server.engine.views import PromptLogprobs, TokenDelta

log = logging.getLogger(__name__)
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
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # per token: where the text it released starts
    prompt_logprobs: PromptLogprobs | None = None  # sent with the first delta, when asked for
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
        self.top_logprobs.extend(delta.top_logprobs or [()] * len(delta.token_ids))  # []: none asked
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs
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

    def scored(self, shift: int = 0) -> ScoredTokens:
        """The generated tokens with their logprobs; text offsets ``shift`` characters further."""
        offsets = [shift + offset for offset in self.text_offsets]
        return ScoredTokens(self.token_ids, self.logprobs, self.top_logprobs, offsets)

    @staticmethod
    def total_usage(choices: list[Generation], choices_per_prompt: int = 1) -> schemas.Usage:
        """Each prompt counted once (its choices are consecutive), every choice's completion added up."""
        prompt = sum(g.prompt_tokens for g in choices[:: max(choices_per_prompt, 1)])
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


class Formatter:
    """The OpenAI shapes of one endpoint; ``piece`` is the part of a Generation one chunk carries.
    Choices come prompt by prompt, ``choices_per_prompt`` each (usage counts each prompt once)."""

    def __init__(
        self, request_id: str, model: str, tokenizer: Any, logprobs: bool, choices_per_prompt: int = 1
    ) -> None:
        self.request_id, self.model, self.token_text = request_id, model, TokenTexts(tokenizer)
        self.want_logprobs = logprobs
        self.choices_per_prompt = choices_per_prompt
        self.created = int(time.time())

    def first_chunk(self, num_choices: int = 1) -> dict | None:
        return None

    def has_news(self, piece: Generation, index: int) -> bool:
        """Whether a delta of choice ``index`` is worth a chunk."""
        return bool(piece.text or piece.finish_reason or (self.want_logprobs and piece.token_ids))

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        """One streamed chunk of choice ``index``; ``base_offset``: characters of it sent before."""
        raise NotImplementedError

    def usage_chunk(self, choices: list[Generation]) -> dict:
        raise NotImplementedError

    def response(self, choices: list[Generation]) -> dict:
        """The whole body: one choice per generation, in order, and the usage of them all."""
        raise NotImplementedError

    def usage(self, choices: list[Generation]) -> schemas.Usage:
        return Generation.total_usage(choices, self.choices_per_prompt)


class CompletionFormatter(Formatter):
    """``text_completion`` bodies; logprobs in the legacy shape. With ``echoes`` (one per choice,
    completions' ``echo``) a choice's text, tokens and logprobs start with its prompt's: in the
    whole body, or in the choice's first streamed chunk (as vLLM streams it)."""

    def __init__(self, *args: Any, echoes: list[Echo | None] | None = None, **kwargs: Any) -> None:
        """``Formatter``'s arguments, and ``echoes``."""
        super().__init__(*args, **kwargs)
        self.echoes = echoes
        self._echoed: set[int] = set()  # streamed choices whose prompt went out

    def _echo(self, index: int) -> Echo | None:
        return self.echoes[index] if self.echoes else None

    def _choice(
        self, gen: Generation, index: int, base_offset: int, with_prompt: bool
    ) -> schemas.CompletionChoice:
        """Choice ``index`` of ``gen`` (a whole generation or a piece ``base_offset`` characters in),
        its prompt's text and tokens first when ``with_prompt``."""
        echo = self._echo(index)
        prompt = echo if with_prompt else None
        shift = base_offset + (len(echo.text) if echo is not None else 0)
        parts = [ScoredTokens.of_prompt(prompt, gen.prompt_logprobs)] if prompt is not None else []
        text = (prompt.text if prompt is not None else "") + gen.text
        logprobs = (
            completion_logprobs([*parts, gen.scored(shift)], self.token_text) if self.want_logprobs else None
        )
        return schemas.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=gen.finish_reason
        )

    def _body(self, choices: list[schemas.CompletionChoice], usage: schemas.Usage | None) -> dict:
        return schemas.CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump()

    def has_news(self, piece: Generation, index: int) -> bool:
        pending = self._echo(index) is not None and index not in self._echoed
        return pending or super().has_news(piece, index)

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        with_prompt = index not in self._echoed
        self._echoed.add(index)
        return self._body([self._choice(piece, index, base_offset, with_prompt)], None)

    def usage_chunk(self, choices: list[Generation]) -> dict:
        return self._body([], self.usage(choices))

    def response(self, choices: list[Generation]) -> dict:
        body = [self._choice(g, i, 0, with_prompt=True) for i, g in enumerate(choices)]
        return self._body(body, self.usage(choices))


class ChatFormatter(Formatter):
    """``chat.completion`` bodies and ``chat.completion.chunk`` deltas (the first carries the role).

    With ``tools`` (a plan whose replies may call them) each choice's text is read for calls
    (``server.api.tool_calls``): they come out as ``tool_calls``, streamed as tool-call deltas, and
    a reply that made calls and stopped by itself finishes with ``tool_calls``."""

    def __init__(self, *args: Any, tools: ToolPlan | None = None, **kwargs: Any) -> None:
        """``Formatter``'s arguments, and ``tools``."""
        super().__init__(*args, **kwargs)
        self.tools = tools
        self._readers: dict[int, ToolCallReader] = {}  # streamed choices' readers

    def _read(self, reader: ToolCallReader, text: str, finished: bool) -> ReadOut:
        out = reader.push(text)
        return out.add(reader.finish()) if finished else out

    @staticmethod
    def _finish_reason(reason: str | None, reader: ToolCallReader | None) -> str | None:
        return "tool_calls" if reason == "stop" and reader is not None and reader.calls else reason

    def _logprobs(self, gen: Generation) -> schemas.ChatLogprobs | None:
        return chat_logprobs(gen.scored(), self.token_text) if self.want_logprobs else None

    def _chunk(self, choices: list[schemas.ChatChunkChoice], usage: schemas.Usage | None = None) -> dict:
        return schemas.ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump()

    def first_chunk(self, num_choices: int = 1) -> dict:
        delta = schemas.ChatDelta(role="assistant", content="")
        return self._chunk([schemas.ChatChunkChoice(index=i, delta=delta) for i in range(num_choices)])

    def chunk(self, piece: Generation, base_offset: int = 0, index: int = 0) -> dict:
        reader = None
        if self.tools is None:
            delta = schemas.ChatDelta(content=piece.text or None)
        else:
            reader = self._readers.setdefault(index, ToolCallReader(self.tools))
            out = self._read(reader, piece.text, piece.finish_reason is not None)
            delta = schemas.ChatDelta(content=out.content or None, tool_calls=out.calls or None)
        choice = schemas.ChatChunkChoice(
            index=index, delta=delta, logprobs=self._logprobs(piece),
            finish_reason=self._finish_reason(piece.finish_reason, reader),
        )  # fmt: skip
        return self._chunk([choice])

    def _message(self, gen: Generation) -> tuple[schemas.AssistantMessage, str | None]:
        """A whole choice's message and finish reason."""
        if self.tools is None:
            return schemas.AssistantMessage(content=gen.text), gen.finish_reason
        reader = ToolCallReader(self.tools)
        out = self._read(reader, gen.text, finished=True)
        content = out.content or None if reader.calls else out.content
        message = schemas.AssistantMessage(content=content, tool_calls=reader.calls)
        return message, self._finish_reason(gen.finish_reason, reader)

    def usage_chunk(self, choices: list[Generation]) -> dict:
        return self._chunk([], self.usage(choices))

    def response(self, choices: list[Generation]) -> dict:
        body = []
        for i, g in enumerate(choices):
            message, finish_reason = self._message(g)
            body.append(schemas.ChatChoice(index=i, message=message, logprobs=self._logprobs(g),
                                           finish_reason=finish_reason))  # fmt: skip
        return schemas.ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=body,
            usage=self.usage(choices),
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
        if formatter.has_news(piece, index):
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
