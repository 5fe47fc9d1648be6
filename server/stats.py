"""A rolling window of what the server did, for the built-in ops dashboard (``GET /v1/stats``).

Prometheus keeps history for operators who run one; the dashboard must work without it, so the
server keeps the last ``retention_s`` seconds itself, in time buckets of ``bucket_s`` seconds:

- generation requests and their errors (HTTP status ≥ 400), fed by the metrics middleware;
- requests and generated tokens per adapter and per calling tenant, fed by the request path, and
  the requests refused over a tenant limit;
- time to first token and inter-token latency, as log-bucketed sketches (``LatencySketch``);
- generated tokens and the running batch, queue, KV usage and merged copies after each engine
  step (gauges keep their maximum per bucket);
- the adapter cache's and the prefix cache's cumulative counters when each bucket opens, so hit
  rates can be windowed.

Memory is bounded: at most ``retention_s / bucket_s`` buckets, each with two fixed-size sketches
and counters keyed only by the adapters and tenants active in it. The engine thread, the event
loop and readers share one lock; every call holds it for O(1) work, except ``summary``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

BUCKET_S = 2.0
RETENTION_S = 900.0
MAX_SERIES_POINTS = 150  # a longer window merges neighbouring buckets into one point


class LatencySketch:
    """Counts of durations in geometric buckets (each ``RATIO`` times the last) from ``MIN_S``.

    ``quantile`` answers with the geometric middle of the bucket holding the rank, so it is within
    ±5% of the true sample quantile for durations in [MIN_S, MIN_S·RATIO^NUM_BUCKETS ≈ 18 min];
    longer ones count as that.
    """

    MIN_S = 1e-4
    RATIO = 1.1
    NUM_BUCKETS = 170

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[self._index(seconds)] += 1
        self.total += 1

    def merge(self, other: LatencySketch) -> None:
        self.counts.update(other.counts)
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0 ≤ q ≤ 1) of the durations added, None when there are none."""
        if self.total == 0:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return self.MIN_S * self.RATIO ** (index - 0.5) if index > 0 else self.MIN_S
        raise AssertionError("unreachable: ranks never exceed total")

    @classmethod
    def _index(cls, seconds: float) -> int:
        if seconds <= cls.MIN_S:
            return 0
        return min(cls.NUM_BUCKETS, math.ceil(math.log(seconds / cls.MIN_S, cls.RATIO)))


@dataclass(frozen=True)
class CacheCounters:
    """Cumulative adapter-cache counters (``AdapterCache.stats``), sampled when a bucket opens."""

    hits: int = 0  # lookups served from a slot or host memory
    lookups: int = 0  # all lookups, disk misses included
    prefix_hits: int = 0  # prompt tokens found in the prefix cache
    prefix_queries: int = 0  # prompt tokens looked up there


@dataclass(frozen=True)
class StepGauges:
    """The engine right after one step."""

    generated_tokens: int
    waiting: int
    running: int
    kv_cache_usage: float  # 0..1
    merged_copies: int


@dataclass(kw_only=True)
class Activity:
    """Requests, tokens and latencies over some time, per adapter and per calling tenant too."""

    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    ttft: LatencySketch = field(default_factory=LatencySketch)
    itl: LatencySketch = field(default_factory=LatencySketch)
    adapter_requests: Counter[str] = field(default_factory=Counter)
    adapter_tokens: Counter[str] = field(default_factory=Counter)
    tenant_requests: Counter[str] = field(default_factory=Counter)
    tenant_tokens: Counter[str] = field(default_factory=Counter)
    tenant_limit_hits: Counter[str] = field(default_factory=Counter)

    def add(self, other: Activity) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.generated_tokens += other.generated_tokens
        self.ttft.merge(other.ttft)
        self.itl.merge(other.itl)
        self.adapter_requests.update(other.adapter_requests)
        self.adapter_tokens.update(other.adapter_tokens)
        self.tenant_requests.update(other.tenant_requests)
        self.tenant_tokens.update(other.tenant_tokens)
        self.tenant_limit_hits.update(other.tenant_limit_hits)


@dataclass(kw_only=True)
class Bucket(Activity):
    """What happened in ``[index·bucket_s, (index+1)·bucket_s)``, and the engine's gauges then."""

    index: int
    counters: CacheCounters
    steps: int = 0
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    merged_copies: int = 0


@dataclass
class Series:
    """Per-point figures, oldest first; ``t`` is each point's start (unix seconds)."""

    t: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)
    errors_per_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    ttft_p50_s: list[float | None] = field(default_factory=list)
    ttft_p99_s: list[float | None] = field(default_factory=list)
    itl_p50_s: list[float | None] = field(default_factory=list)
    itl_p99_s: list[float | None] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    kv_cache_usage: list[float] = field(default_factory=list)
    merged_copies: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class WindowSummary(Activity):
    """The last ``window_s`` seconds: totals, rates, latency sketches, busiest keys, series."""

    window_s: float
    hit_rate: float | None = None  # adapter-cache hits / lookups within the window
    prefix_cache_hit_rate: float | None = None  # prefix-cache hit tokens / looked-up tokens, same
    series: Series = field(default_factory=Series)


class StatsRecorder:
    """Records into the current bucket; ``summary(window_s)`` reads the last ``window_s`` seconds.

    ``cache_counters`` is called (under the recorder's lock) each time a bucket opens; ``clock``
    returns unix seconds.
    """

    def __init__(self, cache_counters: Callable[[], CacheCounters] = CacheCounters,
                 clock: Callable[[], float] = time.time, bucket_s: float = BUCKET_S,
                 retention_s: float = RETENTION_S) -> None:  # fmt: skip
        if bucket_s <= 0 or retention_s < bucket_s:
            raise ValueError(f"need 0 < bucket_s ({bucket_s}) <= retention_s ({retention_s})")
        self.bucket_s, self.retention_s = bucket_s, retention_s
        self._cache_counters, self.clock = cache_counters, clock
        self._buckets: deque[Bucket] = deque(maxlen=math.ceil(retention_s / bucket_s) + 1)
        self._lock = threading.Lock()
        self.started_s = clock()

    # ---- writers ----
    def record_request(self, status: int) -> None:
        """A generation request answered with HTTP ``status`` (≥ 400 counts as an error)."""
        with self._lock:
            bucket = self._current()
            bucket.requests += 1
            bucket.errors += status >= 400

    def record_arrival(self, adapter: str, tenant: str) -> None:
        """A generation request for ``adapter`` (the base model's served name for none) from ``tenant``."""
        with self._lock:
            bucket = self._current()
            bucket.adapter_requests[adapter] += 1
            bucket.tenant_requests[tenant] += 1

    def record_tokens(self, adapter: str, tenant: str, num_tokens: int) -> None:
        with self._lock:
            bucket = self._current()
            bucket.adapter_tokens[adapter] += num_tokens
            bucket.tenant_tokens[tenant] += num_tokens

    def record_limit_hit(self, tenant: str) -> None:
        """A request of ``tenant`` refused over one of its limits (it never reaches the engine)."""
        with self._lock:
            self._current().tenant_limit_hits[tenant] += 1

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self._current().ttft.add(seconds)

    def record_itl(self, seconds: float) -> None:
        with self._lock:
            self._current().itl.add(seconds)

    def record_step(self, gauges: StepGauges) -> None:
        with self._lock:
            bucket = self._current()
            bucket.steps += 1
            bucket.generated_tokens += gauges.generated_tokens
            bucket.waiting = max(bucket.waiting, gauges.waiting)
            bucket.running = max(bucket.running, gauges.running)
            bucket.kv_cache_usage = max(bucket.kv_cache_usage, gauges.kv_cache_usage)
            bucket.merged_copies = max(bucket.merged_copies, gauges.merged_copies)

    def _current(self) -> Bucket:
        index = math.floor(self.clock() / self.bucket_s)
        if not self._buckets or self._buckets[-1].index < index:
            self._buckets.append(Bucket(index=index, counters=self._cache_counters()))
        return self._buckets[-1]

    # ---- reader ----
    def summary(self, window_s: float, cache_now: CacheCounters | None = None) -> WindowSummary:
        """Totals over the last ``window_s`` seconds, the current bucket included; series over as
        many whole buckets, ending with the last one that is over (a partial one would read low).
        ``cache_now``: the cache counters now, for the windowed hit rate."""
        with self._lock:
            last = math.floor(self.clock() / self.bucket_s)
            first = last - max(1, math.ceil(window_s / self.bucket_s)) + 1
            buckets = [b for b in self._buckets if b.index >= first]
        summary = WindowSummary(window_s=window_s)
        for bucket in buckets:
            summary.add(bucket)
        if cache_now is not None and buckets:
            start = buckets[0].counters
            lookups = cache_now.lookups - start.lookups
            summary.hit_rate = (cache_now.hits - start.hits) / lookups if lookups > 0 else None
            queries = cache_now.prefix_queries - start.prefix_queries
            prefix_hits = cache_now.prefix_hits - start.prefix_hits
            summary.prefix_cache_hit_rate = prefix_hits / queries if queries > 0 else None
        summary.series = self._series(buckets, first - 1, last - 1)  # the current bucket is not over
        return summary

    def _series(self, buckets: list[Bucket], first: int, last: int) -> Series:
        by_index = {b.index: b for b in buckets}
        group = max(1, math.ceil((last - first + 1) / MAX_SERIES_POINTS))
        series = Series()
        merged_copies = 0  # copies outlive idle buckets: carried forward, unlike the batch and queue
        for start in range(first, last + 1, group):
            members = [by_index[i] for i in range(start, min(start + group, last + 1)) if i in by_index]
            if any(b.steps for b in members):
                merged_copies = max(b.merged_copies for b in members if b.steps)
            _add_point(series, start * self.bucket_s, members, group * self.bucket_s)
            series.merged_copies.append(merged_copies)
        return series


def _add_point(series: Series, start_s: float, members: list[Bucket], span_s: float) -> None:
    """One point (all but merged copies) from the buckets of ``span_s`` seconds starting at
    ``start_s``; idle buckets are absent from ``members``."""
    ttft, itl = LatencySketch(), LatencySketch()
    for bucket in members:
        ttft.merge(bucket.ttft)
        itl.merge(bucket.itl)
    series.t.append(start_s)
    series.requests_per_s.append(sum(b.requests for b in members) / span_s)
    series.errors_per_s.append(sum(b.errors for b in members) / span_s)
    series.tokens_per_s.append(sum(b.generated_tokens for b in members) / span_s)
    series.ttft_p50_s.append(ttft.quantile(0.5))
    series.ttft_p99_s.append(ttft.quantile(0.99))
    series.itl_p50_s.append(itl.quantile(0.5))
    series.itl_p99_s.append(itl.quantile(0.99))
    series.waiting.append(max((b.waiting for b in members), default=0))
    series.running.append(max((b.running for b in members), default=0))
    series.kv_cache_usage.append(max((b.kv_cache_usage for b in members), default=0.0))
