"""Typed exceptions, built from the server's OpenAI-style error bodies.

The server answers every failure with ``{"error": {"message", "type", "param", "code"}}``; the
status code picks the exception class, the body fills its fields. Transport failures (nothing or
no complete answer came back) are ``ConnectionError`` and ``TimeoutError``, whose ``status`` is None.
An ``error`` event inside a stream has no status of its own: its ``type`` picks the class.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LoraplexError(Exception):
    """Any failure of a call to the server.

    ``status``: the HTTP status (None for transport failures and errors sent inside a stream);
    ``type``/``code``/``param``/``message``: the fields of the server's error body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status is not None else ""
        suffix = f" [{self.code}]" if self.code else ""
        return f"{prefix}{self.message}{suffix}"


class BadRequestError(LoraplexError):
    """400: the request was refused (bad field, refused sampling setting, context too long...)."""


class AuthenticationError(LoraplexError):
    """401: missing or unknown API key."""


class PermissionDeniedError(LoraplexError):
    """403: the key may not do this (admin-only route, another tenant)."""


class NotFoundError(LoraplexError):
    """404: unknown model or adapter (another tenant's looks the same), or unknown route."""


class ConflictError(LoraplexError):
    """409: e.g. too many pinned adapters."""


class PayloadTooLargeError(LoraplexError):
    """413: the adapter or the request body is over the server's limit."""


class InvalidAdapterError(LoraplexError):
    """422: the upload is not a servable peft adapter; ``message`` says why."""


class RateLimitError(LoraplexError):
    """429: the server's queue is full; ``retry_after_s`` says when to come back."""


class ServerError(LoraplexError):
    """5xx: the server failed (or an ``error`` event of type ``server_error`` ended a stream)."""


class ServiceUnavailableError(ServerError):
    """503: the server is draining or its engine stopped."""


class ConnectionError(LoraplexError):
    """The server could not be reached, or the connection broke before the answer was complete."""


class TimeoutError(LoraplexError):
    """No answer within the client's timeout."""


_BY_STATUS: dict[int, type[LoraplexError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidAdapterError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
_BY_TYPE: dict[str, type[LoraplexError]] = {
    "invalid_request_error": BadRequestError,
    "rate_limit_error": RateLimitError,
    "server_error": ServerError,
}


def error_class(status: int | None, type: str | None = None) -> type[LoraplexError]:
    """The exception class for a status (or, without one, for an error body's ``type``)."""
    if status is None:
        return _BY_TYPE.get(type or "", LoraplexError)
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else LoraplexError


def error_from_body(body: Any, status: int | None, retry_after_s: float | None = None) -> LoraplexError:
    """The exception for a decoded error body; a body without the OpenAI shape keeps its text."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": body if isinstance(body, str) else json.dumps(body)}
    message = str(detail.get("message") or f"HTTP {status}")
    cls = error_class(status, detail.get("type"))
    return cls(
        message, status=status, type=detail.get("type"), code=detail.get("code"),
        param=detail.get("param"), retry_after_s=retry_after_s,
    )  # fmt: skip


def error_from_response(response: httpx.Response, retry_after_s: float | None = None) -> LoraplexError:
    """The exception for an error response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or response.reason_phrase or f"HTTP {response.status_code}"
    return error_from_body(body, response.status_code, retry_after_s)


def transport_error(exc: httpx.TransportError) -> LoraplexError:
    """Our exception for an httpx transport failure (the original stays as ``__cause__``)."""
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"timed out: {exc}" if str(exc) else "timed out")
    return ConnectionError(f"connection failed: {exc}" if str(exc) else "connection failed")
