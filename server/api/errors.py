"""Every failure leaves the server as an OpenAI-shaped JSON error; never as a traceback.

Status codes:

- 400 ``invalid_request_error``: a body that is not JSON or does not match the schema (FastAPI's
  422 becomes 400, ``param`` names the field), a refused sampling setting (``param`` is the
  SamplingParams field), any other ``EngineError`` (``code`` = its code, e.g.
  ``context_length_exceeded``);
- 401 ``invalid_api_key`` / 403 ``permission_denied`` (server.api.auth);
- 404 ``model_not_found``: an unknown ``model`` or adapter (another tenant's looks the same);
- 409 ``too_many_pinned``; 413 ``adapter_too_large`` or an oversized body;
- 422 ``invalid_adapter``: an upload that is not a servable peft adapter, with the reason;
- 404/405 for unknown routes and methods, in the same shape;
- 500 ``server_error`` with a generic message for anything unexpected (logged with its traceback).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters.errors import (
    AdapterFormatError,
    AdapterTooLargeError,
    CompositionError,
    PinError,
    StoreError,
    StoreUnavailableError,
    UnknownAdapterError,
)
from server.api.schemas import ErrorDetail, ErrorResponse
from server.engine.errors import ContextLengthError, EngineError
from server.engine.sampler import SamplingParams

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_MAX_REPORTED_ERRORS = 3


class ApiError(Exception):
    """A request the API refuses, with everything its JSON error body needs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class HttpError:
    """The one HTTP error an exception type means: status, OpenAI ``code`` and ``param``."""

    exception: type[Exception]
    status: int
    code: str | None
    param: str | None = None
    type: str = "invalid_request_error"  # 5xx rows: server_error


# Every refusal of the layers below, as a table: the first row whose type matches wins, so a
# subclass comes before its base. The message is the exception's own.
HTTP_ERRORS: tuple[HttpError, ...] = (
    HttpError(UnknownAdapterError, 404, "model_not_found", "model"),
    HttpError(AdapterTooLargeError, 413, "adapter_too_large", "files"),
    HttpError(AdapterFormatError, 422, "invalid_adapter", "files"),
    HttpError(PinError, 409, "too_many_pinned"),
    HttpError(StoreError, 400, "invalid_adapter_source"),
    HttpError(CompositionError, 400, "invalid_composition"),  # param: the exception's own
    HttpError(StoreUnavailableError, 503, "store_unavailable", type="server_error"),
    HttpError(ContextLengthError, 400, ContextLengthError.code),
    HttpError(EngineError, 400, None),
)


def from_exception(exc: Exception) -> ApiError | None:
    """The ApiError of ``HTTP_ERRORS`` for ``exc``, or None when no row names its type."""
    for row in HTTP_ERRORS:
        if isinstance(exc, row.exception):
            param = getattr(exc, "param", None) or row.param
            return ApiError(row.status, str(exc), type=row.type, param=param, code=row.code)
    return None


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")


def from_adapter_error(exc: Exception) -> ApiError:
    """``HTTP_ERRORS``' row for ``exc`` (413 oversized, 422 not servable, 409 too many pins, ...),
    else 400 for a refused path or name."""
    known = from_exception(exc)
    if known is not None:
        return known
    if isinstance(exc, OSError):
        return ApiError(400, f"cannot use that path: {exc.strerror or exc}", param="lora_path",
                        code="invalid_adapter_source")  # fmt: skip
    return ApiError(400, str(exc), code="invalid_adapter_source")


def from_sampling_error(exc: ValueError) -> ApiError:
    """400 for a ValueError raised by SamplingParams; ``param`` is the field its message starts with."""
    message = str(exc)
    first_word = message.split(" ", 1)[0]
    return ApiError(400, message, param=first_word if first_word in _SAMPLING_FIELDS else None)


def from_validation_error(exc: RequestValidationError) -> ApiError:
    """400 naming the first bad field; a body that is not JSON at all says so."""
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return ApiError(400, f"The request body is not valid JSON: {detail}".rstrip(": "))
    if not errors:
        return ApiError(400, "Invalid request.")
    messages = [_describe(e) for e in errors[:_MAX_REPORTED_ERRORS]]
    if len(errors) > _MAX_REPORTED_ERRORS:
        messages.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more")
    return ApiError(400, "; ".join(messages), param=_param(errors[0].get("loc", ())))


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') → 'messages[0].content'; None for the body itself."""
    parts = [p for p in loc if p != "body"] if loc and loc[0] == "body" else list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _describe(error: dict) -> str:
    """One line for one pydantic error: "temperature: Input should be a valid number"."""
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    loc, param = error.get("loc", ()), _param(error.get("loc", ()))
    if error.get("type") == "missing":
        message = "this field is required"
    if error.get("type") == "extra_forbidden":
        message = "this server does not support this field (docs/api.md lists the fields it accepts)"
    if loc == ("body",) and error.get("type") == "model_attributes_type":
        return "The request body must be a JSON object (sent with Content-Type: application/json)."
    if param and isinstance(loc[-1], str) and message.startswith(f"{loc[-1]} "):
        return param + message[len(loc[-1]) :]  # the message already names the field
    return f"{param}: {message}" if param else message


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an OpenAI-shaped error body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    async def _known(_: Request, exc: Exception) -> JSONResponse:
        known = from_exception(exc)
        return (known or _server_error()).response()

    for row in HTTP_ERRORS:
        app.add_exception_handler(row.exception, _known)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        response = ApiError(exc.status_code, str(exc.detail), code=getattr(exc, "code", None)).response()
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after responding, so uvicorn logs the traceback (server side only).
        return _server_error().response()


def _server_error() -> ApiError:
    return ApiError(500, "The server had an error while processing your request.", type="server_error")
