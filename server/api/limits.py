"""Load and size limits, decided before any work is done for a request.

- ``BodySizeLimit`` (ASGI middleware): a body over its route's limit is a 413, from its
  Content-Length header at once, or from the bytes counted while it streams in (chunked uploads).
  Adapter uploads get the adapter size limit; every other route a small JSON limit.
- ``Admission``: 503 (with Retry-After) while the engine is not running or the server drains, 429
  (with Retry-After) when ``max_queue`` requests already wait beyond the running batch. It runs
  before the prompt is tokenized, so an overloaded server spends nothing on refused requests, and
  an admitted request holds its place from the check on (while it is resolved and tokenized, before
  the engine counts it), so a burst cannot overrun the limit.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError

DEFAULT_MAX_BODY_BYTES = 16 * 1024**2  # generous for prompts given as token ids
UPLOAD_OVERHEAD_BYTES = 1024**2  # multipart framing and the config file around the weights
RETRY_AFTER_S = 1
DRAINING_MESSAGE = "The server is shutting down; retry on another replica."
UPLOAD_PATH = "/v1/adapters"


class BodyTooLarge(HTTPException):
    code = "request_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {max_bytes} bytes.")


class BodySizeLimit:
    """Refuse request bodies over ``max_body_bytes`` (``max_upload_bytes`` for adapter uploads)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.max_upload_bytes if is_upload else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reject(send, limit)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)  # FastAPI passes HTTPExceptions from body parsing through
            return message

        await self.app(scope, counting_receive, send)


async def _reject(send: Send, limit: int) -> None:
    response = ApiError(413, BodyTooLarge(limit).detail, code=BodyTooLarge.code).response()
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Admission:
    """At most ``max_num_seqs + max_queue`` engine requests running, waiting, or admitted and still
    being prepared (adapter resolved, prompt tokenized). Used on the event loop only: the check and
    the reservation happen with no await between them, so concurrent requests see each other."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.preparing = 0  # engine requests admitted and not submitted yet

    def reserve(self, engine, is_draining: bool, num_choices: int = 1) -> Reservation:
        """A place for ``num_choices`` engine requests, or 503 / 429 (ApiError) at once."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if is_draining:
            raise ApiError(503, DRAINING_MESSAGE, type="server_error", code="draining", headers=retry)
        if not engine.is_running:
            raise ApiError(503, "The engine is not running.", type="server_error", code="engine_stopped",
                           headers=retry)  # fmt: skip
        in_flight = engine.num_unfinished + self.preparing
        if in_flight + num_choices > engine.limits.max_num_seqs + self.max_queue:
            raise ApiError(
                429, f"The server is at capacity ({in_flight} requests in flight); retry later.",
                type="rate_limit_error", code="queue_full", headers=retry,
            )  # fmt: skip
        self.preparing += num_choices
        return Reservation(self, num_choices)


class Reservation:
    """A request's place from admission until the engine counts it (``release``, idempotent; also
    on leaving the ``with`` block, e.g. when tokenizing or validation fails)."""

    def __init__(self, admission: Admission, num_choices: int) -> None:
        self._admission, self._count = admission, num_choices

    def release(self) -> None:
        self._admission.preparing -= self._count
        self._count = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
