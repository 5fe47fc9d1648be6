"""What the sync and async clients share: settings, the retry policy, request paths and bodies."""

from __future__ import annotations

import email.utils
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import httpx

from loraplex_client._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "LORAPLEX_BASE_URL"
API_KEY_ENV = "LORAPLEX_API_KEY"
DEFAULT_TIMEOUT_S = 600.0  # a long generation is one response; the server bounds it with max_tokens
DEFAULT_MAX_RETRIES = 3
RETRY_STATUSES = frozenset({429, 503})
# Failures where the server has not started on the request (or dropped an idle keep-alive
# connection): safe to send again. Read/write timeouts are not retried: the work may be under way.
RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError)
MAX_RETRY_AFTER_S = 60.0

Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
Message = Mapping[str, Any]


@dataclass(frozen=True)
class Settings:
    """Where and how to call: explicit arguments win over ``LORAPLEX_BASE_URL``/``LORAPLEX_API_KEY``."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None):
        base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        return cls(base_url.rstrip("/"), api_key, timeout)

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": f"loraplex-client/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **(extra or {})}


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_retries`` more attempts after a 429/503 or a connection failure.

    The wait is the server's ``Retry-After`` when it sent one, else exponential backoff
    (``initial_backoff_s`` · 2^attempt, at most ``max_backoff_s``) scaled by a random factor in
    [0.5, 1] so that many clients refused together do not come back together.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    def after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying attempt ``attempt`` (0-based), or None: do not retry."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        retry_after = retry_after_s(response)
        return self.backoff_s(attempt) if retry_after is None else retry_after

    def after_error(self, attempt: int, exc: httpx.TransportError) -> float | None:
        if not isinstance(exc, RETRYABLE_ERRORS) or attempt >= self.max_retries:
            return None
        return self.backoff_s(attempt)

    def backoff_s(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), capped; None when absent."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# compose=: {"a": 0.7, "b": 0.4}, [("a", 0.7), ("b", 0.4)] or ["a", "b"] (weight 1)
Composition = Mapping[str, float] | Sequence[tuple[str, float] | str]


def completion_body(model: str, prompt: Prompt, stream: bool, sampling: Mapping[str, Any]) -> dict:
    fields = with_composition(sampling)
    return {"model": model, "prompt": _jsonable(prompt), **fields, "stream": stream}


def chat_body(model: str, messages: Sequence[Message], stream: bool, sampling: Mapping[str, Any]) -> dict:
    fields = with_composition(sampling)
    return {"model": model, "messages": [dict(m) for m in messages], **fields, "stream": stream}


def with_composition(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with a ``compose=`` argument turned into the request's ``adapters`` list."""
    out = dict(fields)
    compose = out.pop("compose", None)
    if compose is not None:
        out["adapters"] = adapters_field(compose)
    return out


def compose_body(name: str, compose: Composition, tenant: str | None, recipe: Mapping[str, Any]) -> dict:
    """The body of ``POST /v1/adapters/compose``."""
    body = {"name": name, "adapters": adapters_field(compose), **recipe}
    return body if tenant is None else {**body, "tenant": tenant}


def adapters_field(compose: Composition) -> list[dict[str, Any]]:
    items = compose.items() if isinstance(compose, Mapping) else compose
    parts = []
    for item in items:
        name, weight = (item, 1.0) if isinstance(item, str) else item
        parts.append({"name": name, "weight": weight})
    return parts


def _jsonable(prompt: Prompt) -> Any:
    if isinstance(prompt, str):
        return prompt
    return [item if isinstance(item, int | str) else list(item) for item in prompt]


ADAPTERS_PATH = "/v1/adapters"


def adapter_path(name: str, action: str | None = None) -> str:
    """``/v1/adapters/{name}`` or ``/v1/adapters/{name}/{action}`` (the name URL-quoted)."""
    path = f"{ADAPTERS_PATH}/{quote(name, safe='')}"
    return f"{path}/{action}" if action else path


def tenant_params(tenant: str | None) -> dict[str, str]:
    return {} if tenant is None else {"tenant": tenant}
