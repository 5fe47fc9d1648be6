"""Clients that stall or pile up: deadlines for a request's headers and body, so no client holds a
connection (and a place under ``--max-connections``) by sending nothing, or a byte now and then,
and a cap on open connections.

- ``guarded_protocol(timeout_s, max_connections)``: uvicorn's h11 protocol, plus
  - a cap: a connection beyond ``max_connections`` open ones gets a 503 ``too_many_connections``
    (OpenAI-style JSON, ``Retry-After``) and is closed at once, before it costs a request;
  - a deadline that starts with a connection (or with the first byte of the next request on a
    kept-alive one) and ends when the request's headers are complete. A header trickle
    (slowloris) cannot stretch it: it is a total, not an idle timer. On expiry the client gets a
    408 with an OpenAI-style JSON body and the connection is closed. uvicorn itself has no such deadline.
- ``BodyGuard`` (ASGI middleware): once the headers are in, each chunk of the body must arrive
  within ``timeout_s`` of the previous one (an upload that keeps moving may take longer in all);
  a stalled body is a 408 ``request_timeout``. A body still arriving when the server starts to
  drain (SIGTERM) is a 503 ``draining`` with Retry-After: its request was never admitted, so it
  is refused cleanly instead of being cut off when uvicorn closes the connection. Messages after
  the body (waiting for a disconnect) are never timed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import ApiError
from server.api.limits import DRAINING_MESSAGE, RETRY_AFTER_S

TIMEOUT_CODE = "request_timeout"


class RequestTimeout(HTTPException):
    code = TIMEOUT_CODE

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(408, f"The request {what} did not arrive within {timeout_s:g} seconds.")


def _error_response(status: str, error: ApiError, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with ``error``'s body, for a connection about to be closed."""
    body = json.dumps(error.body())
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{retry}"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return (head + body).encode()


def guarded_protocol(timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol subclass (for ``uvicorn.Config(http=...)``) with the header deadline and the
    connection cap of the module doc."""
    timed_out = _error_response(
        "408 Request Timeout", ApiError(408, RequestTimeout("headers", timeout_s).detail, code=TIMEOUT_CODE)
    )
    full = ApiError(503, f"The server has {max_connections} connections open; retry later.",
                    type="server_error", code="too_many_connections")  # fmt: skip
    too_many = _error_response("503 Service Unavailable", full, retry_after=RETRY_AFTER_S)

    class GuardedProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # adds this one to the server's open connections
            if len(self.connections) > max_connections:
                self._refuse(transport)
                return
            self._arm()

        def _refuse(self, transport) -> None:
            """Answer 503 and half-close; what the client sends meanwhile is read and dropped (a
            close with unread data would reset the connection and lose the answer), and the
            connection is closed when the client closes or after ``timeout_s``."""
            self._refused = True
            transport.write(too_many)
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(timeout_s, transport.close)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self._request_in_progress():
                self._disarm()  # the headers are complete: BodyGuard and the app take over
            elif self._deadline is None and not self.transport.is_closing():
                self._arm()  # the first bytes of the next request on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _request_in_progress(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self._request_in_progress() or self.transport.is_closing():
                return
            self.transport.write(timed_out)
            self.transport.close()

    return GuardedProtocol


class ServerDraining(HTTPException):
    code = "draining"

    def __init__(self) -> None:
        super().__init__(503, DRAINING_MESSAGE, headers={"Retry-After": str(RETRY_AFTER_S)})


class BodyGuard:
    """408 for a body that stalls ``timeout_s`` between chunks, 503 for one still arriving while
    ``is_draining()`` (see the module doc)."""

    def __init__(self, app: ASGIApp, timeout_s: float, is_draining: Callable[[], bool]) -> None:
        self.app, self.timeout_s, self.is_draining = app, timeout_s, is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise RequestTimeout("body", self.timeout_s) from None
            if self.is_draining() and message.get("more_body", False):
                raise ServerDraining
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
