"""The ops dashboard: ``GET /v1/stats`` (admin, JSON) and the page that draws it, ``GET /dashboard``.

The page is static (``server/dashboard/``: HTML, one script, one stylesheet, no build step, nothing
fetched from elsewhere) and holds no data: it asks for an admin key when the server has keys,
keeps it in the tab's ``sessionStorage``, and polls ``/v1/stats`` with it every few seconds.

``/v1/stats`` answers from the server's own rolling window (``server.stats``) plus the engine and
adapter cache as they are now. With thousands of adapters it stays small: the busiest ``top``
adapters and tenants of the window, and at most ``top`` adapters whose id contains ``search``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from adapters.cache_types import Tier
from adapters.tenant_limits import TenantLimits, describe
from adapters.tenants import Principal
from server import metrics
from server.api.auth import admin
from server.api.errors import ApiError
from server.engine.engine import Engine
from server.engine.fairness import TenantService
from server.engine.views import AdapterRuntime, MergedCopyView
from server.stats import BUCKET_S, RETENTION_S, LatencySketch, WindowSummary

router = APIRouter()
Admin = Annotated[Principal, Depends(admin)]
DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads only its own script and stylesheet and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class Latency(BaseModel):
    p50_s: float | None
    p99_s: float | None


class Totals(BaseModel):
    requests: int
    errors: int  # generation requests answered with status >= 400
    error_ratio: float | None
    generated_tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft: Latency
    itl: Latency


class EngineNow(BaseModel):
    waiting: int
    running: int
    max_num_seqs: int
    kv_cache_usage: float
    max_loras: int
    preemptions: int
    prefix_cache_hit_rate: float | None  # tokens found cached / tokens looked up, since start
    prefix_cache_hit_rate_window: float | None  # the same within the window
    prefix_cache_blocks: int  # KV blocks holding cached prefixes now (part of the KV cache)
    prefix_cache_bytes: int


class AdapterActivity(BaseModel):
    id: str  # engine id ``tenant/name@version``, or the base model's served name
    tenant: str | None
    name: str
    version: int | None
    requests: int  # in the window
    tokens: int  # generated in the window
    tier: str | None  # disk, loading, host, slot, failed; None for the base model or a removed version
    pinned: bool
    merged: bool


class MergedCopyInfo(BaseModel):
    id: str
    state: str
    bytes: int
    pinned: bool
    leases: int


class AdapterStats(BaseModel):
    registered: int
    tiers: dict[str, int]
    hit_rate: float | None  # slot or host hits / lookups, within the window
    hit_rate_total: float | None  # since start
    loads: int  # disk (or the shared bucket) → host memory reads
    slot_loads: int  # host memory → device slot copies
    load_failures: int
    load_p50_s: float | None  # over the most recent loads (up to 1024)
    load_p99_s: float | None
    host_bytes: int
    merged: list[MergedCopyInfo]
    busiest: list[AdapterActivity]
    matches: list[AdapterActivity] | None  # only when ``search`` was given
    matches_total: int


class TenantActivity(BaseModel):
    tenant: str
    requests: int
    tokens: int
    limit_hits: int  # requests refused over one of its limits (429), in the window
    queue_s_mean: float | None  # engine arrival → first admission, averaged since start
    limits: str  # its limits as ``keys list`` shows them (``-``: none)


class StatsResponse(BaseModel):
    object: Literal["stats"] = "stats"
    model: str
    now: float
    uptime_s: float
    window_s: float
    bucket_s: float
    totals: Totals
    engine: EngineNow
    adapters: AdapterStats
    tenants: list[TenantActivity]
    series: dict[str, list[float | None]]
    config: dict[str, object] = {}  # every setting the server runs with, by config key


@router.get("/v1/stats")
async def stats(
    request: Request, _: Admin,
    window: Annotated[float, Query(ge=10, le=RETENTION_S, description="seconds to summarise")] = 300,
    top: Annotated[int, Query(ge=1, le=100, description="adapters and tenants to list")] = 10,
    search: Annotated[str | None, Query(max_length=200, description="substring of adapter ids")] = None,
) -> StatsResponse:  # fmt: skip
    """What the server did over the last ``window`` seconds and how it stands now (admin)."""
    state = request.app.state.loraplex
    installed: metrics.ServerMetrics | None = getattr(request.app.state, "loraplex_metrics", None)
    if installed is None:
        raise ApiError(404, "This server keeps no statistics (metrics are not installed).", code="not_found")
    snapshot = await run_in_threadpool(
        _snapshot, installed, state.engine, state.served_model_name, window, top, search, state.auth.limits
    )
    return snapshot.model_copy(update={"config": state.settings})


def _snapshot(installed: metrics.ServerMetrics, engine: Engine, served_model_name: str, window: float,
              top: int, search: str | None,
              limits: Callable[[str], TenantLimits]) -> StatsResponse:  # fmt: skip
    recorder = installed.stats
    summary = recorder.summary(window, engine.cache_lookups())
    now = engine.stats()
    return StatsResponse(
        model=served_model_name, now=recorder.clock(), uptime_s=recorder.clock() - recorder.started_s,
        window_s=window, bucket_s=BUCKET_S, totals=_totals(summary),
        engine=EngineNow(
            waiting=now.num_waiting, running=now.num_running, max_num_seqs=engine.limits.max_num_seqs,
            kv_cache_usage=now.kv_cache_usage, max_loras=now.max_loras, preemptions=now.num_preemptions,
            prefix_cache_hit_rate=now.prefix_cache_hit_rate,
            prefix_cache_hit_rate_window=summary.prefix_cache_hit_rate,
            prefix_cache_blocks=now.prefix_cache_blocks, prefix_cache_bytes=now.prefix_cache_bytes,
        ),
        adapters=_adapter_stats(summary, engine, top, search),
        tenants=_busiest_tenants(summary, top, engine.tenant_service(), limits),
        series=vars(summary.series),
    )  # fmt: skip


def _totals(summary: WindowSummary) -> Totals:
    return Totals(
        requests=summary.requests, errors=summary.errors,
        error_ratio=summary.errors / summary.requests if summary.requests else None,
        generated_tokens=summary.generated_tokens, requests_per_s=summary.requests / summary.window_s,
        tokens_per_s=summary.generated_tokens / summary.window_s,
        ttft=_latency(summary.ttft), itl=_latency(summary.itl),
    )  # fmt: skip


def _latency(sketch: LatencySketch) -> Latency:
    return Latency(p50_s=sketch.quantile(0.5), p99_s=sketch.quantile(0.99))


def _adapter_stats(summary: WindowSummary, engine: Engine, top: int, search: str | None) -> AdapterStats:
    cache = engine.cache_snapshot()
    totals = engine.cache_lookups()
    loads = list(cache.recent_load_seconds)
    activity = summary.adapter_tokens + summary.adapter_requests  # both: a request may not have a token yet
    busiest = sorted(activity, key=lambda a: (-summary.adapter_tokens[a], -summary.adapter_requests[a], a))
    registered = engine.registered_adapter_ids()
    matches, found = None, []
    if search is not None:
        needle = search.lower()
        found = sorted(i for i in registered if needle in i.lower())
        found.sort(key=lambda a: -summary.adapter_tokens[a])  # stable: busiest first, then by id
    runtime = engine.adapter_runtime({*busiest[:top], *found[:top]})
    if search is not None:
        matches = [_activity(a, summary, runtime.get(a)) for a in found[:top]]
    return AdapterStats(
        registered=len(registered), tiers=metrics.adapters_per_tier(cache),
        hit_rate=summary.hit_rate, hit_rate_total=totals.hits / totals.lookups if totals.lookups else None,
        loads=cache.num_loads, slot_loads=cache.lookups[Tier.HOST], load_failures=cache.num_load_failures,
        load_p50_s=_quantile(loads, 0.5), load_p99_s=_quantile(loads, 0.99), host_bytes=cache.host_bytes,
        merged=[_copy_info(c) for c in engine.merge_snapshot().copies],
        busiest=[_activity(a, summary, runtime.get(a)) for a in busiest[:top]],
        matches=matches, matches_total=len(found),
    )  # fmt: skip


def _copy_info(copy: MergedCopyView) -> MergedCopyInfo:
    return MergedCopyInfo(
        id=copy.adapter_id, state=copy.state.value, bytes=copy.num_bytes, pinned=copy.is_pinned,
        leases=copy.num_leases,
    )  # fmt: skip


def _activity(adapter: str, summary: WindowSummary, runtime: AdapterRuntime | None) -> AdapterActivity:
    """``runtime`` None: the base model, or a version deleted or replaced since."""
    tenant, name, version = _parse_engine_id(adapter)
    if tenant is None:
        runtime = None
    return AdapterActivity(
        id=adapter, tenant=tenant, name=name, version=version,
        requests=summary.adapter_requests[adapter], tokens=summary.adapter_tokens[adapter],
        tier=None if runtime is None else metrics.TIERS[runtime.state],
        pinned=bool(runtime and runtime.is_pinned), merged=bool(runtime and runtime.is_merged),
    )  # fmt: skip


def _parse_engine_id(adapter: str) -> tuple[str | None, str, int | None]:
    """``tenant/name@version`` → its parts; anything else (the base model) → (None, adapter, None)."""
    owner, slash, rest = adapter.partition("/")
    name, at, version = rest.rpartition("@")
    if not (slash and at and version.isdigit()):
        return None, adapter, None
    return owner, name, int(version)


def _busiest_tenants(summary: WindowSummary, top: int, service: dict[str, TenantService],
                     limits: Callable[[str], TenantLimits]) -> list[TenantActivity]:  # fmt: skip
    activity: Counter[str] = summary.tenant_tokens + summary.tenant_requests + summary.tenant_limit_hits
    ranked = sorted(activity, key=lambda t: (-summary.tenant_tokens[t], -summary.tenant_requests[t], t))
    rows = []
    for tenant in ranked[:top]:
        served = service.get(tenant)
        queue_s = served.queue_s_sum / served.num_admitted if served and served.num_admitted else None
        rows.append(TenantActivity(
            tenant=tenant, requests=summary.tenant_requests[tenant], tokens=summary.tenant_tokens[tenant],
            limit_hits=summary.tenant_limit_hits[tenant], queue_s_mean=queue_s,
            limits=describe(limits(tenant)),
        ))  # fmt: skip
    return rows


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted ``values``; None when empty."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    """The page itself; its data comes from ``/v1/stats``, which needs an admin key."""
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str) -> FileResponse:
    """The page's script and stylesheet; any other name is a 404 (no path is ever joined from input)."""
    if asset not in ASSETS:
        raise ApiError(404, f"No dashboard file {asset!r}.", code="not_found")
    return FileResponse(DASHBOARD_DIR / asset, media_type=ASSETS[asset], headers=PAGE_HEADERS)
