"""server.stats: the dashboard's rolling window, on a hand-driven clock."""

from __future__ import annotations

import random
import threading

import pytest

from server.stats import MAX_SERIES_POINTS, CacheCounters, LatencySketch, StatsRecorder, StepGauges


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def step(tokens: int = 1, waiting: int = 0, running: int = 1, kv: float = 0.1, merged: int = 0) -> StepGauges:
    return StepGauges(tokens, waiting, running, kv, merged)


def test_sketch_quantiles_are_within_five_percent_of_the_samples():
    rng = random.Random(0)
    samples = sorted(rng.lognormvariate(-3, 1.5) for _ in range(20_000))  # ~0.1 ms … seconds
    sketch = LatencySketch()
    for s in samples:
        sketch.add(s)
    for q in (0.01, 0.5, 0.9, 0.99):
        exact = samples[round(q * len(samples)) - 1]
        assert sketch.quantile(q) == pytest.approx(exact, rel=0.05), q
    assert LatencySketch().quantile(0.5) is None


def test_sketch_clamps_tiny_and_huge_durations():
    sketch = LatencySketch()
    sketch.add(0.0)
    sketch.add(1e9)
    assert sketch.quantile(0.0) == LatencySketch.MIN_S
    assert 600 < sketch.quantile(1.0) < 1e9  # the last bucket, not an error


def test_window_counts_only_its_buckets():
    clock = Clock()
    stats = StatsRecorder(clock=clock, bucket_s=2, retention_s=60)
    stats.record_request(200)
    stats.record_step(step(tokens=10))
    clock.now += 30
    stats.record_request(200)
    stats.record_request(500)
    stats.record_request(404)
    stats.record_step(step(tokens=4))
    recent = stats.summary(10)
    assert (recent.requests, recent.errors, recent.generated_tokens) == (3, 2, 4)
    everything = stats.summary(60)
    assert (everything.requests, everything.errors, everything.generated_tokens) == (4, 2, 14)


def test_retention_drops_old_buckets():
    clock = Clock()
    stats = StatsRecorder(clock=clock, bucket_s=1, retention_s=10)
    for _ in range(30):
        stats.record_request(200)
        clock.now += 1
    assert stats.summary(10).requests == 9  # the last 10 seconds: 9 full ones and the current, empty
    assert stats.summary(1000).requests <= 11  # never more than retention, whatever is asked


def test_busiest_adapters_and_tenants():
    clock = Clock()
    stats = StatsRecorder(clock=clock)
    for adapter, tenant, tokens in (("acme/a@1", "acme", 5), ("acme/a@1", "acme", 7), ("x/b@2", "x", 3)):
        stats.record_arrival(adapter, tenant)
        stats.record_tokens(adapter, tenant, tokens)
    stats.record_arrival("base", "x")  # a request that has not produced a token yet
    stats.record_limit_hit("y")  # refused: it never arrived
    summary = stats.summary(60)
    assert summary.adapter_tokens.most_common() == [("acme/a@1", 12), ("x/b@2", 3)]
    assert summary.adapter_requests == {"acme/a@1": 2, "x/b@2": 1, "base": 1}
    assert summary.tenant_tokens == {"acme": 12, "x": 3}
    assert summary.tenant_requests == {"acme": 2, "x": 2}
    assert summary.tenant_limit_hits == {"y": 1}


def test_series_rates_and_gaps():
    clock = Clock(1000.0)
    stats = StatsRecorder(clock=clock, bucket_s=2)
    stats.record_step(step(tokens=8, waiting=3, running=2))
    stats.record_ttft(0.2)
    clock.now += 4  # one idle bucket between
    stats.record_step(step(tokens=2, running=1))
    clock.now += 2  # the series ends with the last bucket that is over
    series = stats.summary(10).series
    assert len(series.t) == 5 and series.t[-1] == 1004.0
    assert series.tokens_per_s[-3:] == [4.0, 0.0, 1.0]
    assert series.waiting[-3:] == [3, 0, 0] and series.running[-3:] == [2, 0, 1]
    assert series.ttft_p50_s[-3] == pytest.approx(0.2, rel=0.05)
    assert series.ttft_p50_s[-2] is None and series.ttft_p50_s[-1] is None


def test_long_windows_merge_buckets_into_at_most_max_points():
    clock = Clock()
    stats = StatsRecorder(clock=clock, bucket_s=1, retention_s=900)
    for _ in range(900):
        stats.record_step(step(tokens=3))
        clock.now += 1
    summary = stats.summary(900)
    assert len(summary.series.t) <= MAX_SERIES_POINTS
    assert summary.generated_tokens == 3 * 899  # the current second has none yet
    assert summary.series.tokens_per_s[-1] == pytest.approx(3.0), "6 buckets per point, all busy"
    assert summary.series.t[-1] + 6 == clock.now


def test_merged_copies_carry_over_idle_buckets():
    clock = Clock(1000.0)
    stats = StatsRecorder(clock=clock, bucket_s=1)
    stats.record_step(step(merged=1))
    clock.now += 4
    assert stats.summary(10).series.merged_copies[-4:] == [1, 1, 1, 1]


def test_hit_rate_is_windowed():
    clock = Clock()
    counters = CacheCounters(hits=90, lookups=100)  # 90% before the window
    stats = StatsRecorder(lambda: counters, clock=clock, bucket_s=1, retention_s=100)
    clock.now += 50
    stats.record_step(step())  # opens a bucket: snapshot 90/100
    summary = stats.summary(10, CacheCounters(hits=91, lookups=110))
    assert summary.hit_rate == pytest.approx(1 / 10)
    assert stats.summary(10, counters).hit_rate is None  # no lookups in the window


def test_concurrent_writers_lose_nothing():
    stats = StatsRecorder()

    def write() -> None:
        for _ in range(2000):
            stats.record_tokens("t/a@1", "t", 1)
            stats.record_step(step(tokens=1))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = stats.summary(900)
    assert summary.adapter_tokens["t/a@1"] == summary.generated_tokens == 8000


@pytest.mark.parametrize("bucket_s, retention_s", [(0, 10), (5, 1)])
def test_bad_settings_are_refused(bucket_s, retention_s):
    with pytest.raises(ValueError, match="bucket_s"):
        StatsRecorder(bucket_s=bucket_s, retention_s=retention_s)
