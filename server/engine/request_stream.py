"""One request's token deltas as an async iterator, fed by the engine thread (``Engine.submit``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.engine.views import TokenDelta

# on_close(request_id, finished): the stream ended; finished False means the consumer stopped early
CloseHook = Callable[[str, bool], None]


class RequestStream:
    """Async iterator over one request's deltas; closing it early (even unstarted) aborts the request."""

    def __init__(self, request_id: str, stream: asyncio.Queue[TokenDelta], on_close: CloseHook) -> None:
        self.request_id = request_id
        self._stream = stream
        self._on_close = on_close
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            delta = await self._stream.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if delta.finish_reason is not None:
            self._finished = True
            self._close()
        return delta

    async def aclose(self) -> None:
        """Stop consuming: a request not finished yet is aborted."""
        if not self._finished:
            self._finished = True
            self._close(aborted=True)
        self._close()

    def _close(self, aborted: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self.request_id, not aborted)


def deliver(items: list[tuple[asyncio.Queue[TokenDelta], TokenDelta]]) -> None:
    """On the event loop: each delta into its request's stream."""
    for stream, delta in items:
        stream.put_nowait(delta)
