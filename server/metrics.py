"""Every Prometheus metric of the server, in one place: ``install(app, engine)`` wires them.

Names follow ``loraplex_<area>_<what>_<unit>`` with small fixed label sets; the ``tenant`` label
holds at most ``MAX_TENANT_LABELS`` tenants (the first seen; later ones are counted as
``OTHER_TENANT``). Adapter ids are never label values, except on ``vllm:lora_requests_info``
(vLLM's own gauge, kept for its dashboards: one series whose labels name the adapters running and
waiting now). Each app has its own
``CollectorRegistry``, so several apps in one process never collide.

Where the numbers come from:
- an ASGI middleware: HTTP requests by route template (unknown paths: "other") and status;
- the request path (``request_observer`` → ``output.collect`` / ``output.sse_events``): time to
  first token, inter-token latency and end-to-end latency of generation requests;
- the tenant limits (``server.api.quotas``): each refusal, by tenant and limit;
- the engine thread: the engine's step observer after every step (tokens, adapters per step,
  step time) and its load observer after every adapter load from disk (its duration);
- at scrape time, ``EngineCollector`` reads the engine's snapshots (``Engine.stats``,
  ``cache_snapshot``, ``merge_snapshot``: gauges, and the counters the engine keeps itself), so
  they are never stale.

Everything comes through the ``Engine`` facade and the typed values of ``server/engine/views.py``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.cache_types import AdapterState, Tier
from server.engine.engine import Engine
from server.engine.fairness import TenantService
from server.engine.route import RouteKind
from server.engine.views import CacheSnapshot, EngineStats, MergeSnapshot, StepStats, TokenDelta
from server.stats import StatsRecorder, StepGauges

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)  # max_loras is at most 256
TOKEN_BUCKETS = tuple(2**i for i in range(15))  # 1 … 16384 tokens per step
TIERS = {
    AdapterState.ON_DISK: "disk",
    AdapterState.LOADING: "loading",
    AdapterState.IN_HOST: "host",
    AdapterState.IN_SLOT: "slot",
    AdapterState.FAILED: "failed",
}
OTHER_ENDPOINT = "other"
MAX_TENANT_LABELS = 64
# TenantService field → (family type, help); None: part of the queue-time summary
TENANT_FIGURES: dict[str, tuple[type[CounterMetricFamily] | type[GaugeMetricFamily] | None, str]] = {
    "prompt_tokens": (CounterMetricFamily, "Prompt tokens admitted, by tenant."),
    "generated_tokens": (CounterMetricFamily, "Tokens generated, by tenant."),
    "virtual_tokens": (GaugeMetricFamily, "The fair scheduler's weighted service counter, by tenant."),
    "num_admitted": (None, ""),
    "queue_s_sum": (None, ""),
}
OTHER_TENANT = "(other)"  # parentheses are not allowed in tenant names: never a real tenant
GENERATION_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})  # what /v1/stats counts
LORA_INFO = "vllm:lora_requests_info"
# vLLM's scheduler gauges under vLLM's names and meanings, labelled by ``model_name`` as vLLM does:
# what the Gateway API Inference Extension (llm-d) and vLLM dashboards route and alert on.
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
VLLM_PREFIX_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")  # prompt tokens


class ServerMetrics:
    """The metrics of one app; the registry also holds an ``EngineCollector`` for ``engine``."""

    def __init__(self, engine: Engine, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "loraplex_http_requests", "HTTP requests by route template and status code.",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.e2e_latency = self._latency("request_e2e_latency", "Arrival to last token, finished requests.")
        self.ttft = self._latency("request_time_to_first_token", "Arrival to the first generated token.")
        self.itl = self._latency("request_inter_token_latency", "Time between a request's token deltas.")
        self.prompt_tokens = self._counter("engine_prompt_tokens", "Prompt tokens, once per request.")
        self.generated_tokens = self._counter("engine_generated_tokens", "Tokens generated.")
        self.step_adapters = self._histogram(
            "engine_step_adapters", "Distinct adapters in one engine step.", ADAPTER_BUCKETS
        )
        self.step_tokens = self._histogram(
            "engine_step_tokens", "Tokens fed to one engine step.", TOKEN_BUCKETS
        )
        self.step_duration = self._latency("engine_step_duration", "Wall time of one non-empty engine step.")
        self.adapter_load_latency = self._latency("adapter_cache_load_duration", "Disk → host adapter loads.")
        self.tenants = TenantMetrics(self.registry)
        self.registry.register(EngineCollector(engine, model_name, self.tenants))
        self.stats = StatsRecorder(lambda: engine.cache_lookups())  # read when a bucket opens

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"loraplex_{name}", doc, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: Iterable[float]) -> Histogram:
        return Histogram(f"loraplex_{name}", doc, buckets=tuple(buckets), registry=self.registry)

    def _latency(self, name: str, doc: str) -> Histogram:
        return self._histogram(f"{name}_seconds", doc, LATENCY_BUCKETS_S)

    def request_timer(self, adapter: str, tenant: str) -> RequestTimer:
        """A GenerationObserver for one request for ``adapter`` from ``tenant`` arriving now."""
        self.stats.record_arrival(adapter, tenant)
        self.tenants.requests.labels(self.tenants.label(tenant)).inc()
        return RequestTimer(self, adapter, tenant)

    def record_limit_hit(self, tenant: str, limit: str) -> None:
        """A request refused over ``tenant``'s ``limit`` (server.api.quotas)."""
        self.tenants.limit_hits.labels(self.tenants.label(tenant), limit).inc()
        self.stats.record_limit_hit(tenant)

    def observe_step(self, step: StepStats) -> None:
        """The engine's step observer: runs in the engine thread after every non-empty step."""
        self.prompt_tokens.inc(step.num_prompt_tokens)
        self.generated_tokens.inc(step.num_generated_tokens)
        self.step_adapters.observe(step.num_adapters)
        self.step_tokens.observe(step.num_tokens)
        self.step_duration.observe(step.duration_s)
        self.stats.record_step(StepGauges(
            step.num_generated_tokens, step.num_waiting, step.num_running, step.kv_cache_usage,
            step.num_merged_copies,
        ))  # fmt: skip

    def watch(self, engine: Engine) -> None:
        """Observe the engine's steps and adapter loads (beside any other observers)."""
        engine.add_step_observer(self.observe_step)
        engine.add_load_observer(self.adapter_load_latency.observe)


class TenantMetrics:
    """Per-tenant figures: requests and limit refusals counted here, tokens and queue time read from
    the engine at scrape time (``tenant_families``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "loraplex_tenant_requests",
            "Generation requests, by calling tenant.",
            ["tenant"],
            registry=registry,
        )
        self.limit_hits = Counter(
            "loraplex_tenant_limit_hits", "Requests refused over a tenant limit (429).", ["tenant", "limit"],
            registry=registry,
        )  # fmt: skip
        self._labels: set[str] = set()
        self._lock = threading.Lock()

    def label(self, tenant: str) -> str:
        """``tenant`` itself for the first MAX_TENANT_LABELS tenants seen, then OTHER_TENANT."""
        with self._lock:
            if tenant not in self._labels and len(self._labels) < MAX_TENANT_LABELS:
                self._labels.add(tenant)
            return tenant if tenant in self._labels else OTHER_TENANT


def tenant_families(service: dict[str, TenantService], label: Callable[[str], str]) -> Iterator[Metric]:
    """Tokens served, queue time and the fair scheduler's counter, per tenant label (tenants past
    the label limit summed into one)."""
    rows: dict[str, dict[str, float]] = {}
    for tenant, figures in service.items():
        row = rows.setdefault(label(tenant), defaultdict(float))
        for name in TENANT_FIGURES:
            row[name] += getattr(figures, name)
    queue = SummaryMetricFamily(
        "loraplex_tenant_queue_seconds", "Arrival in the engine to first admission.", labels=["tenant"]
    )
    for tenant, row in rows.items():
        queue.add_metric([tenant], count_value=row["num_admitted"], sum_value=row["queue_s_sum"])
    yield queue
    for name, (kind, doc) in TENANT_FIGURES.items():
        if kind is None:
            continue
        family = kind(f"loraplex_tenant_{name}", doc, labels=["tenant"])
        for tenant, row in rows.items():
            family.add_metric([tenant], row[name])
        yield family


class RequestTimer:
    """A ``GenerationObserver`` timing one request from its creation (the request's arrival).

    TTFT: arrival → first delta with tokens. ITL: between consecutive deltas with tokens (one
    observation per delta; the engine sends one token per delta). E2E: arrival → end of the
    response path, observed once and only for requests that finished (stop or length).
    """

    def __init__(self, metrics: ServerMetrics, adapter: str, tenant: str) -> None:
        self._metrics, self._adapter, self._tenant = metrics, adapter, tenant
        self._arrival_s = time.perf_counter()
        self._last_token_s: float | None = None
        self._finished = self._ended = False

    def on_delta(self, delta: TokenDelta) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            stats = self._metrics.stats
            if self._last_token_s is None:
                self._metrics.ttft.observe(now - self._arrival_s)
                stats.record_ttft(now - self._arrival_s)
            else:
                self._metrics.itl.observe(now - self._last_token_s)
                stats.record_itl(now - self._last_token_s)
            self._last_token_s = now
            stats.record_tokens(self._adapter, self._tenant, len(delta.token_ids))
        self._finished = delta.finish_reason in ("stop", "length")

    def on_end(self) -> None:
        if not self._ended and self._finished:
            self._metrics.e2e_latency.observe(time.perf_counter() - self._arrival_s)
        self._ended = True


class EngineCollector(Collector):
    """Engine and adapter-cache state, read when Prometheus scrapes (any thread)."""

    def __init__(self, engine: Engine, model_name: str = "", tenants: TenantMetrics | None = None) -> None:
        self.engine, self.model_name, self.tenants = engine, model_name, tenants

    def collect(self) -> Iterator[Metric]:
        if self.tenants is not None:
            yield from tenant_families(self.engine.tenant_service(), self.tenants.label)
        stats = self.engine.stats()
        yield from engine_families(stats)
        yield from vllm_families(stats, self.model_name)
        yield from prefix_cache_families(stats, self.model_name)
        yield from cache_families(self.engine.cache_snapshot())
        yield from merge_families(self.engine.merge_snapshot())


def merge_families(stats: MergeSnapshot) -> Iterator[Metric]:
    """Merged copies now, merge/unmerge events, build time, tokens served merged vs in the base
    forward (``path="side"``: the side path or the base model alone)."""
    yield GaugeMetricFamily("loraplex_merge_copies", "Merged copies serving new requests.", len(stats.copies))
    yield GaugeMetricFamily("loraplex_merge_bytes", "Bytes held by merged copies.", stats.bytes_held)
    events = CounterMetricFamily("loraplex_merge_events", "Merges and unmerges.", labels=["event"])
    events.add_metric(["merge"], stats.num_merges)
    events.add_metric(["unmerge"], stats.num_unmerges)
    yield events
    yield SummaryMetricFamily(
        "loraplex_merge_build_duration_seconds", "Time to build a merged copy.",
        count_value=stats.num_merges, sum_value=stats.build_seconds_sum,
    )  # fmt: skip
    tokens = CounterMetricFamily("loraplex_merge_tokens", "Tokens computed, by path.", labels=["path"])
    tokens.add_metric([RouteKind.MERGED.value], stats.tokens_merged)
    tokens.add_metric([RouteKind.SIDE.value], stats.tokens_base_forward)
    yield tokens


def engine_families(stats: EngineStats) -> Iterator[Metric]:
    """Queue gauges, KV usage, preemptions, and vLLM's LoRA info gauge (one series, value = now)."""
    yield GaugeMetricFamily("loraplex_scheduler_waiting_requests", "Requests waiting.", stats.num_waiting)
    yield GaugeMetricFamily("loraplex_scheduler_running_requests", "Running batch size.", stats.num_running)
    yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "KV blocks in use, 0..1.", stats.kv_cache_usage)
    yield CounterMetricFamily(
        "loraplex_scheduler_preemptions", "Sequences preempted for KV memory.", stats.num_preemptions
    )
    info = GaugeMetricFamily(
        LORA_INFO, "Running and waiting LoRA adapters (vLLM-compatible).",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )  # fmt: skip
    labels = [",".join(stats.running_adapter_ids), ",".join(stats.waiting_adapter_ids), str(stats.max_loras)]
    info.add_metric(labels, time.time())
    yield info


def vllm_families(stats: EngineStats, model_name: str) -> Iterator[Metric]:
    """``vllm:num_requests_running`` / ``_waiting`` and ``vllm:kv_cache_usage_perc`` (a fraction, 1 =
    full, as in vLLM despite the name), each with the ``model_name`` label (the served name)."""
    values = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
    docs = ("Number of requests in model execution batches.", "Number of requests waiting to be processed.",
            "KV-cache usage. 1 means 100 percent usage.")  # fmt: skip
    for name, doc, value in zip(VLLM_GAUGES, docs, values, strict=True):
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family


def prefix_cache_families(stats: EngineStats, model_name: str) -> Iterator[Metric]:
    """vLLM's prefix-cache counters (prompt tokens looked up, and found cached; ``model_name``
    labelled as vLLM's) and the cached blocks now: their count, bytes and evictions."""
    docs = ("Prefix cache queries, in terms of number of queried tokens.",
            "Prefix cache hits, in terms of number of cached tokens.")  # fmt: skip
    values = (stats.prefix_cache_queries, stats.prefix_cache_hits)
    for name, doc, value in zip(VLLM_PREFIX_COUNTERS, docs, values, strict=True):
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family
    yield GaugeMetricFamily(
        "loraplex_prefix_cache_blocks", "KV blocks holding cached prefixes.", stats.prefix_cache_blocks
    )
    yield GaugeMetricFamily(
        "loraplex_prefix_cache_bytes", "Bytes of KV blocks holding cached prefixes.", stats.prefix_cache_bytes
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_evictions", "Cached KV blocks evicted for room.", stats.prefix_cache_evictions
    )


def cache_families(cache: CacheSnapshot) -> Iterator[Metric]:
    """Adapters per tier, hits/misses per tier, evictions per tier, loads, host bytes."""
    tiers = GaugeMetricFamily(
        "loraplex_adapter_cache_adapters", "Registered adapters by tier.", labels=["tier"]
    )
    for tier, count in adapters_per_tier(cache).items():
        tiers.add_metric([tier], count)
    yield tiers
    lookups = cache.lookups
    yield _by_tier("loraplex_adapter_cache_hits", "Lookups served from a slot or host memory.",
                   {"slot": lookups[Tier.SLOT], "host": lookups[Tier.HOST]})  # fmt: skip
    yield _by_tier("loraplex_adapter_cache_misses", "Lookups that had to read from disk.",
                   {"disk": lookups[Tier.DISK]})  # fmt: skip
    evictions = {tier.value: count for tier, count in cache.evictions.items()}
    yield _by_tier("loraplex_adapter_cache_evictions", "Adapters evicted, by tier left.", evictions)
    yield CounterMetricFamily("loraplex_adapter_cache_loads", "Adapter loads from disk.", cache.num_loads)
    yield CounterMetricFamily(
        "loraplex_adapter_cache_load_failures", "Adapter loads that failed.", cache.num_load_failures
    )
    yield GaugeMetricFamily(
        "loraplex_adapter_cache_host_bytes", "Adapter bytes in host memory.", cache.host_bytes
    )


def adapters_per_tier(cache: CacheSnapshot) -> dict[str, int]:
    """Registered adapters by tier name, every tier present."""
    return {tier: cache.adapters_by_state[state] for state, tier in TIERS.items()}


def _by_tier(name: str, doc: str, values: dict[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["tier"])
    for tier, value in values.items():
        family.add_metric([tier], value)
    return family


class RequestCounter:
    """ASGI middleware: counts each HTTP request by route template and the status it was sent with.

    The template is the ``path`` of the route the router picked (``scope["route"]``; none of our
    routers has a prefix), ``OTHER_ENDPOINT`` when none matched: never the raw URL, so the label
    set stays bounded. A request that raises before its response started counts as 500.
    """

    def __init__(self, app: ASGIApp, counter: Counter, stats: StatsRecorder) -> None:
        self.app, self.counter, self.stats = app, counter, stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or OTHER_ENDPOINT
            self.counter.labels(endpoint, str(status)).inc()
            if endpoint in GENERATION_ENDPOINTS:
                self.stats.record_request(status)


def install(app: FastAPI, engine: Engine, guard: Callable[[Request], Any] | None = None) -> ServerMetrics:
    """Count ``app``'s requests, serve ``GET /metrics``, hook into ``engine``; call before serving.
    ``guard``: a FastAPI dependency every ``/metrics`` request must pass (e.g. an admin key check).

    The returned metrics are also ``app.state.loraplex_metrics`` (see ``request_observer``); a
    second call on the same app changes nothing and returns them again.
    """
    installed: ServerMetrics | None = getattr(app.state, "loraplex_metrics", None)
    if installed is not None:
        return installed
    state = getattr(app.state, "loraplex", None)
    metrics = ServerMetrics(engine, getattr(state, "served_model_name", ""))
    app.add_middleware(RequestCounter, counter=metrics.http_requests, stats=metrics.stats)

    def exposition() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    dependencies = [] if guard is None else [Depends(guard)]
    app.add_api_route(
        "/metrics", exposition, methods=["GET"], include_in_schema=False, dependencies=dependencies
    )
    metrics.watch(engine)
    app.state.loraplex_metrics = metrics
    return metrics


def request_observer(request: Request, adapter: str, tenant: str) -> RequestTimer | None:
    """A timer for the generation ``request`` starts (for ``adapter``: its engine id or the base
    model's served name; from ``tenant``), None when the app has no metrics installed."""
    metrics: ServerMetrics | None = getattr(request.app.state, "loraplex_metrics", None)
    return None if metrics is None else metrics.request_timer(adapter, tenant)
