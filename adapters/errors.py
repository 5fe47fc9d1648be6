"""The adapter registry's refusals: one exception per meaning, each mapped to one HTTP error by
``server/api/errors.py`` (the status and code are named here so the mapping reads as a table)."""

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
