"""The adapter package's refusals: one exception per meaning, all here, each mapped to one HTTP
error by ``server/api/errors.py``'s ``HTTP_ERRORS`` (named in each docstring)."""

from __future__ import annotations


class UnknownAdapterError(LookupError):
    """No such adapter for this caller: an unknown name or engine id, an invalid one, or another
    tenant's adapter. ``str(exc)`` is the one message the API gives for any unknown model, so a
    caller cannot tell "another tenant's adapter" from "no such adapter".

    HTTP 404 ``model_not_found``, ``param`` model.
    """

    def __init__(self, model: object) -> None:
        super().__init__(f"The model {model!r} does not exist.")
        self.model = model


class AdapterFormatError(ValueError):
    """The adapter is not one we can serve; the message names the problem.

    HTTP 422 ``invalid_adapter``, ``param`` files.
    """


class AdapterTooLargeError(AdapterFormatError):
    """An uploaded file is over its size limit. HTTP 413 ``adapter_too_large``, ``param`` files."""


class PinError(ValueError):
    """A pin that cannot be honoured (every other slot is pinned already). HTTP 409 ``too_many_pinned``."""


class CompositionError(ValueError):
    """Adapters that cannot be combined as asked (``adapters/compose.py``; peft's refusals too).
    ``param`` names the request field at fault. HTTP 400 ``invalid_composition``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class StoreError(ValueError):
    """Bad input to the store (a name, a path outside the allowed roots, a symlink); the message says
    what. HTTP 400 ``invalid_adapter_source``."""


class StoreUnavailableError(RuntimeError):
    """The shared store (database or bucket) cannot be reached now; nothing was changed.

    HTTP 503 ``store_unavailable`` (retry later); adapters already cached go on serving.
    """


class KeysFileError(ValueError):
    """The keys file is missing, unreadable or malformed; the message names the file and entry.

    Raised at start (``loraplex serve`` prints it and exits 2) or when a changed file is re-read
    (the server keeps its previous keys).
    """
