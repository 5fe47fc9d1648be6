"""Server-sent events → typed chunks.

The server sends ``data: {chunk}`` events, then ``data: [DONE]``; a generation that fails sends one
``data: {"error": {...}}`` event instead of the rest. ``Stream`` and ``AsyncStream`` parse chunks as
they arrive and close the response when iteration ends, breaks or fails, which makes the server
abort a generation that is still running. A transport failure mid-stream raises ``ConnectionError``
or ``TimeoutError`` and is never retried: part of the answer was already delivered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from loraplex_client.errors import ServerError, error_from_body, transport_error

ChunkT = TypeVar("ChunkT", bound=BaseModel)
DONE = "[DONE]"


class SSEDecoder:
    """Assembles the ``data:`` lines of server-sent events; other fields and comments are skipped."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its line ending); return an event's data when a blank line ends it."""
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The data of the event in progress (None if there is none), as at the end of the stream."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def decode_event(data: str) -> dict[str, Any] | None:
    """One event's JSON payload; None for ``[DONE]``. An error event raises its typed exception."""
    if data.strip() == DONE:
        return None
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise ServerError(f"the server sent an event that is not JSON: {data[:200]!r}") from exc
    if isinstance(payload, dict) and "error" in payload:
        raise error_from_body(payload, status=None)
    return payload


class Stream(Generic[ChunkT]):
    """The typed chunks of one streamed response; iterate once. ``close()`` (or leaving a ``with``
    block) ends the request early."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]) -> None:
        self.response, self._chunk_type = response, chunk_type

    def __iter__(self) -> Iterator[ChunkT]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                if (data := decoder.feed(line)) is None:
                    continue
                if (payload := decode_event(data)) is None:
                    return
                yield self._chunk_type.model_validate(payload)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[ChunkT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream(Generic[ChunkT]):
    """The typed chunks of one streamed response, for ``async for``; ``aclose()`` ends it early."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]) -> None:
        self.response, self._chunk_type = response, chunk_type

    async def __aiter__(self) -> AsyncIterator[ChunkT]:
        decoder = SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                if (data := decoder.feed(line)) is None:
                    continue
                if (payload := decode_event(data)) is None:
                    return
                yield self._chunk_type.model_validate(payload)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[ChunkT]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
