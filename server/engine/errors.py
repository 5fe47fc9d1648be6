"""The engine's refusals of a request; ``server/api/errors.py`` maps each to one HTTP error.

An unknown adapter is ``adapters.errors.UnknownAdapterError`` (the registry's and the engine's
refusal mean the same: 404 ``model_not_found``); ``REQUEST_ERRORS`` holds every exception the
engine raises for a request it will not serve.
"""

from __future__ import annotations

from adapters.errors import UnknownAdapterError


class EngineError(ValueError):
    """A request the engine refuses (HTTP 400); ``code`` is the OpenAI-style error code, ``param``
    the request field at fault when there is one."""

    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(EngineError):
    """Prompt + max_tokens exceed the context (HTTP 400 ``context_length_exceeded``)."""

    code = "context_length_exceeded"


REQUEST_ERRORS: tuple[type[Exception], ...] = (EngineError, UnknownAdapterError)
