"""Per-tenant limits on generation requests: concurrency, requests and tokens per minute.

A tenant's limits come from the keys file (adapters/tenant_limits.py, reloaded with the keys). A
generation request is checked once its prompt is tokenized, before the engine sees it, on the event
loop (check and reservation with no await between them, so a burst cannot overrun a limit):

- ``max_concurrent``: engine requests (prompts × ``n``) of the tenant in flight, this one included;
- ``rpm``: HTTP generation requests admitted in the last 60 s (a sliding window);
- ``tpm``: tokens in the last 60 s; a request counts prompt + ``max_tokens`` per choice when it is
  admitted (the most it can use; with ``max_tokens`` unset that is the rest of the context) and
  its actual prompt + completion tokens once it ends, as OpenAI counts.

Over a limit the request is refused at once with a 429 whose code names the limit
(``rpm_limit_exceeded``, ``tpm_limit_exceeded``, ``max_concurrent_limit_exceeded``), ``Retry-After``
(seconds until the window has room; 1 for concurrency) and the ``x-ratelimit-*`` headers, which
every admitted response carries too. Other tenants are never affected. The counts are kept in this
process: each replica enforces the limits on its own traffic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.tenant_limits import TenantLimits
from server.api.errors import ApiError
from server.engine.views import TokenDelta

WINDOW_S = 60.0
CONCURRENCY_RETRY_S = 1
LIMIT_NAMES = ("max_concurrent", "rpm", "tpm")  # the ``limit`` label of the limits-hit metric


@dataclass
class TokenCharge:
    """Tokens one request counts in the window from ``at_s`` (its estimate, then its actual use)."""

    at_s: float
    num_tokens: int


@dataclass
class TenantUsage:
    """One tenant's use: what is in flight and what the last minute held."""

    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)  # admission times
    charges: deque[TokenCharge] = field(default_factory=deque)

    def expire(self, now_s: float) -> None:
        while self.requests and self.requests[0] <= now_s - WINDOW_S:
            self.requests.popleft()
        while self.charges and self.charges[0].at_s <= now_s - WINDOW_S:
            self.charges.popleft()

    @property
    def num_tokens(self) -> int:
        return sum(charge.num_tokens for charge in self.charges)

    def seconds_until_tokens(self, wanted: int, limit: int, now_s: float) -> float:
        """Seconds until ``wanted`` more tokens fit under ``limit`` as charges leave the window
        (infinite when they never can: more than the limit itself)."""
        if wanted > limit:
            return math.inf
        used, wait_s = self.num_tokens, 0.0
        for charge in self.charges:
            if used + wanted <= limit:
                break
            used -= charge.num_tokens
            wait_s = charge.at_s + WINDOW_S - now_s
        return wait_s


class TenantQuotas:
    """Every tenant's use; ``on_limit(tenant, limit)`` is told each refusal (metrics)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_limit: Callable[[str, str], None] | None = None) -> None:  # fmt: skip
        self.clock, self.on_limit = clock, on_limit
        self._usage: dict[str, TenantUsage] = {}

    def admit(self, tenant: str, limits: TenantLimits, num_requests: int, num_tokens: int) -> QuotaTicket:
        """Reserve one HTTP request of ``num_requests`` engine requests estimated at ``num_tokens``
        tokens, or raise the 429 ApiError of the first limit it would exceed."""
        now = self.clock()
        usage = self._usage.setdefault(tenant, TenantUsage())
        usage.expire(now)
        refusal = _refusal(usage, limits, num_requests, num_tokens, now)
        if refusal is not None:
            limit, message, retry_s = refusal
            if self.on_limit is not None:
                self.on_limit(tenant, limit)
            headers = {
                "Retry-After": str(max(1, math.ceil(retry_s))),
                **rate_limit_headers(usage, limits, now),
            }
            raise ApiError(429, f"Rate limit reached for tenant {tenant!r}: {message}",
                           type="rate_limit_error", code=f"{limit}_limit_exceeded",
                           headers=headers)  # fmt: skip
        usage.in_flight += num_requests
        usage.requests.append(now)
        charge = TokenCharge(now, num_tokens)
        usage.charges.append(charge)
        return QuotaTicket(usage, charge, num_requests, rate_limit_headers(usage, limits, now))

    def in_flight(self, tenant: str) -> int:
        usage = self._usage.get(tenant)
        return 0 if usage is None else usage.in_flight


def _refusal(usage: TenantUsage, limits: TenantLimits, num_requests: int, num_tokens: int,
             now: float) -> tuple[str, str, float] | None:  # fmt: skip
    """(limit name, message, seconds to wait) of the first limit the request exceeds, else None."""
    if limits.max_concurrent is not None and usage.in_flight + num_requests > limits.max_concurrent:
        return "max_concurrent", _over("concurrent requests (max_concurrent)", limits.max_concurrent,
                                       usage.in_flight, num_requests), CONCURRENCY_RETRY_S  # fmt: skip
    if limits.rpm is not None and len(usage.requests) + 1 > limits.rpm:
        retry_s = usage.requests[0] + WINDOW_S - now
        return "rpm", _over("requests per minute (rpm)", limits.rpm, len(usage.requests), 1), retry_s
    if limits.tpm is not None and usage.num_tokens + num_tokens > limits.tpm:
        retry_s = usage.seconds_until_tokens(num_tokens, limits.tpm, now)
        message = _over("tokens per minute (tpm)", limits.tpm, usage.num_tokens, num_tokens)
        if num_tokens > limits.tpm:
            message += "; this request alone is over the limit (lower max_tokens or the prompt)"
        return "tpm", message, retry_s if math.isfinite(retry_s) else WINDOW_S
    return None


def _over(what: str, limit: int, used: int, requested: int) -> str:
    return f"{what}: limit {limit}, used {used}, requested {requested}."


def rate_limit_headers(usage: TenantUsage, limits: TenantLimits, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the limits set, and
    ``x-ratelimit-{limit,remaining}-concurrent`` for ``max_concurrent``."""
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        reset = usage.requests[0] + WINDOW_S - now if usage.requests else 0.0
        headers |= _window_headers("requests", limits.rpm, len(usage.requests), reset)
    if limits.tpm is not None:
        reset = usage.charges[0].at_s + WINDOW_S - now if usage.charges else 0.0
        headers |= _window_headers("tokens", limits.tpm, usage.num_tokens, reset)
    if limits.max_concurrent is not None:
        headers["x-ratelimit-limit-concurrent"] = str(limits.max_concurrent)
        headers["x-ratelimit-remaining-concurrent"] = str(max(0, limits.max_concurrent - usage.in_flight))
    return headers


def _window_headers(kind: str, limit: int, used: int, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
        f"x-ratelimit-reset-{kind}": f"{max(0.0, reset_s):.3g}s",
    }


class QuotaTicket:
    """One admitted request's hold on its tenant's quota. As a ``GenerationObserver`` it sums the
    tokens each choice really used; ``on_end`` (or ``release``, idempotent) frees its concurrency
    and replaces its token estimate with that sum, when it has one."""

    def __init__(self, usage: TenantUsage, charge: TokenCharge, num_requests: int,
                 headers: dict[str, str]) -> None:  # fmt: skip
        self._usage, self._charge, self._num_requests = usage, charge, num_requests
        self.headers = headers  # the x-ratelimit-* headers of the admitted response
        self._actual_tokens = 0
        self._num_ended = 0

    def on_delta(self, delta: TokenDelta) -> None:
        if delta.finish_reason is not None:
            self._actual_tokens += delta.num_prompt_tokens + delta.num_output_tokens
            self._num_ended += 1

    def on_end(self) -> None:
        self.release()

    def release(self) -> None:
        if self._num_requests == 0:
            return
        if self._num_ended == self._num_requests:  # else some choice never ended: keep the estimate
            self._charge.num_tokens = self._actual_tokens
        self._usage.in_flight -= self._num_requests
        self._num_requests = 0


class BothObservers:
    """Two GenerationObservers as one (either may be None)."""

    def __init__(self, *observers: object) -> None:
        self._observers = [o for o in observers if o is not None]

    def on_delta(self, delta: TokenDelta) -> None:
        for observer in self._observers:
            observer.on_delta(delta)  # type: ignore[attr-defined]

    def on_end(self) -> None:
        for observer in self._observers:
            observer.on_end()  # type: ignore[attr-defined]
