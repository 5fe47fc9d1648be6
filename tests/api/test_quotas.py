"""server/api/quotas.py alone, on a clock the test moves: windows slide, actual tokens replace the
estimate, refusals name their limit and count nothing, tenants never share a quota."""

from __future__ import annotations

import pytest

from adapters.tenant_limits import TenantLimits
from server.api.errors import ApiError
from server.api.quotas import WINDOW_S, TenantQuotas
from server.engine.views import TokenDelta


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(
    quotas: TenantQuotas, tenant: str, limits: TenantLimits, requests: int = 1, tokens: int = 1
) -> ApiError:
    with pytest.raises(ApiError) as caught:
        quotas.admit(tenant, limits, requests, tokens)
    assert caught.value.status == 429 and caught.value.type == "rate_limit_error"
    return caught.value


def finished(num_prompt: int, num_output: int) -> TokenDelta:
    return TokenDelta("r", [], "", [], "length", num_prompt, num_output)


def test_rpm_slides_over_sixty_seconds_and_tells_when_to_retry():
    clock, hits = Clock(), []
    quotas = TenantQuotas(clock, on_limit=lambda tenant, limit: hits.append((tenant, limit)))
    limits = TenantLimits(rpm=2)
    first = quotas.admit("a", limits, 1, 10)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    clock.now += 20
    assert quotas.admit("a", limits, 1, 10).headers["x-ratelimit-remaining-requests"] == "0"
    error = refused(quotas, "a", limits)
    assert (
        error.code == "rpm_limit_exceeded" and "requests per minute (rpm): limit 2, used 2" in error.message
    )
    assert error.headers["Retry-After"] == "40" and error.headers["x-ratelimit-limit-requests"] == "2"
    quotas.admit("b", limits, 1, 10)  # another tenant has its own window
    clock.now += 40
    quotas.admit("a", limits, 1, 10)  # the first request left the window
    assert hits == [("a", "rpm")]


def test_max_concurrent_counts_engine_requests_until_released():
    quotas = TenantQuotas(Clock())
    limits = TenantLimits(max_concurrent=3)
    two = quotas.admit("a", limits, 2, 10)
    error = refused(quotas, "a", limits, requests=2)
    assert error.code == "max_concurrent_limit_exceeded" and error.headers["Retry-After"] == "1"
    assert error.headers["x-ratelimit-remaining-concurrent"] == "1"
    one = quotas.admit("a", limits, 1, 10)
    two.on_end()
    two.release()  # idempotent
    assert quotas.in_flight("a") == 1
    quotas.admit("a", limits, 2, 10)
    one.release()
    assert quotas.in_flight("a") == 2


def test_tpm_counts_the_estimate_then_the_actual_tokens():
    clock = Clock()
    quotas = TenantQuotas(clock)
    limits = TenantLimits(tpm=100)
    ticket = quotas.admit("a", limits, 2, 80)  # two choices: prompt + max_tokens each, 40 + 40
    assert refused(quotas, "a", limits, tokens=30).code == "tpm_limit_exceeded"
    for _ in range(2):
        ticket.on_delta(finished(num_prompt=5, num_output=5))
    ticket.on_end()  # they used 20 tokens, not 80
    second = quotas.admit("a", limits, 1, 70)
    assert second.headers["x-ratelimit-remaining-tokens"] == "10"
    clock.now += 10
    error = refused(quotas, "a", limits, tokens=50)
    assert error.headers["Retry-After"] == "50"  # when the first request's 20 tokens leave the window


def test_a_choice_that_never_ended_keeps_its_estimate():
    quotas = TenantQuotas(Clock())
    limits = TenantLimits(tpm=100)
    ticket = quotas.admit("a", limits, 2, 80)
    ticket.on_delta(finished(num_prompt=5, num_output=5))  # the other choice was aborted unseen
    ticket.release()
    assert refused(quotas, "a", limits, tokens=30).code == "tpm_limit_exceeded"


def test_a_request_over_the_whole_tpm_is_told_so():
    error = refused(TenantQuotas(Clock()), "a", TenantLimits(tpm=100), tokens=101)
    assert "this request alone is over the limit" in error.message
    assert error.headers["Retry-After"] == str(int(WINDOW_S))


def test_a_refusal_reserves_nothing():
    quotas = TenantQuotas(Clock())
    limits = TenantLimits(max_concurrent=5, rpm=2, tpm=100)
    refused(quotas, "a", limits, tokens=500)
    assert quotas.in_flight("a") == 0
    quotas.admit("a", limits, 1, 50)
    quotas.admit("a", limits, 1, 50)


def test_no_limits_admit_everything_with_no_headers():
    quotas = TenantQuotas(Clock())
    for _ in range(100):
        assert quotas.admit("a", TenantLimits(), 16, 10**6).headers == {}
