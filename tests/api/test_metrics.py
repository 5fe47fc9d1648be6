"""Prometheus metrics of a real app: a tiny Llama engine in process, served by uvicorn in a thread.

``create_app`` installs the metrics; ``install`` called again returns the same object.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from adapters.registry import AdapterRegistry
from adapters.store import SQLiteAdapterStore
from server.api.app import create_app
from server.engine.engine import Engine
from server.engine.views import EngineLimits
from server.metrics import LORA_INFO, TIERS, VLLM_GAUGES, VLLM_PREFIX_COUNTERS, ServerMetrics, install
from server.stats import CacheCounters
from tests.api.server_process import free_port
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import make_core

BASE_MODEL = "tiny"
ADAPTER, IDLE_ADAPTER = "tiny-lora", "idle-lora"  # IDLE_ADAPTER is registered and never requested
ADAPTER_ID = f"default/{ADAPTER}@1"
MAX_LORAS = 3
GREEDY = {"temperature": 0, "ignore_eos": True}
BOUNDED_LABELS = {
    "endpoint",
    "status",
    "tier",
    "le",
    "event",
    "path",
    "quantile",
    "model_name",
    "tenant",
    "limit",
}


@dataclass(frozen=True)
class Served:
    url: str
    engine: Engine
    metrics: ServerMetrics


# ---- fixtures ----
@pytest.fixture(scope="module")
def served(tiny_llama_factory, tmp_path_factory) -> Iterator[Served]:
    """One engine with two stored adapters (read from disk on first use), its app, uvicorn."""
    root = tmp_path_factory.mktemp("metrics")
    model_dir = tiny_llama_factory(max_position_embeddings=2048)
    engine = Engine(make_core(model_dir, max_loras=MAX_LORAS))
    registry = _registry(engine, model_dir, root)
    app = create_app(engine, BASE_MODEL, registry)
    metrics = install(app, engine)
    try:
        with serving(app) as url:
            yield Served(url, engine, metrics)
    finally:
        engine.shutdown()


def _registry(engine: Engine, model_dir: Path, root: Path) -> AdapterRegistry:
    """Adapters stored before the registry attaches, so the cache holds them on disk only."""
    store = SQLiteAdapterStore(root / "data", allowed_roots=[root])
    registry = AdapterRegistry(
        store, engine.core.config.max_lora_rank, check=engine.core.slot_writer.validate
    )
    for seed, name in enumerate((ADAPTER, IDLE_ADAPTER)):
        path = save_peft_adapter(
            model_dir, root / name, seed=seed, r=8, lora_alpha=16, target_modules=["q_proj"]
        )
        registry.register_local("default", name, path)
    registry.attach(engine.core.adapters)
    return registry


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-metrics-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60) as http:
        yield http


# ---- helpers ----
def wait_for(condition: Callable[[], bool], message: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


def scrape(client: httpx.Client) -> dict[str, dict[tuple, float]]:
    """Sample name → {sorted label items → value}, parsed by prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def requests_served(client: httpx.Client, endpoint: str, status: int) -> float:
    return value(scrape(client), "loraplex_http_requests_total", endpoint=endpoint, status=str(status))


def complete(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": BASE_MODEL, **GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def stream_usage(client: httpx.Client, **body) -> dict:
    """A streamed completion to its end; the usage of its usage chunk."""
    body = {"model": BASE_MODEL, **GREEDY, **body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def wait_idle(engine: Engine) -> None:
    wait_for(lambda: not engine.core.has_work and engine.num_unfinished == 0, "the engine did not go idle")


# ---- tests ----
def test_completions_count_requests_tokens_and_latencies(served, client):
    before = scrape(client)
    usages = [
        complete(client, prompt="Hello", max_tokens=6),
        complete(client, model=ADAPTER, prompt="The cat", max_tokens=4),
        stream_usage(client, prompt="abc", max_tokens=5),
    ]
    n = len(usages)
    ok_before = value(before, "loraplex_http_requests_total", endpoint="/v1/completions", status="200")
    wait_for(lambda: requests_served(client, "/v1/completions", 200) == ok_before + n, "200s not counted")
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("loraplex_engine_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("loraplex_engine_generated_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert grew("loraplex_request_time_to_first_token_seconds_count") == n
    assert grew("loraplex_request_e2e_latency_seconds_count") == n
    itl_count = sum(u["completion_tokens"] - 1 for u in usages)  # one delta per token
    assert grew("loraplex_request_inter_token_latency_seconds_count") == itl_count
    assert grew("loraplex_request_e2e_latency_seconds_sum") > grew(
        "loraplex_request_time_to_first_token_seconds_sum"
    )
    assert grew("loraplex_engine_step_adapters_sum") >= 1  # the adapter request ran in some steps
    assert grew("loraplex_engine_step_duration_seconds_count") >= max(u["completion_tokens"] for u in usages)
    # the same figures per tenant: every request here is the single tenant's, "default"
    assert grew("loraplex_tenant_requests_total", tenant="default") == n
    assert grew("loraplex_tenant_prompt_tokens_total", tenant="default") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert grew("loraplex_tenant_generated_tokens_total", tenant="default") == sum(
        u["completion_tokens"] for u in usages
    )
    assert grew("loraplex_tenant_queue_seconds_count", tenant="default") == n
    assert value(after, "loraplex_tenant_virtual_tokens", tenant="default") > 0


def test_tenant_labels_are_bounded():
    """Past MAX_TENANT_LABELS distinct tenants, the rest share one label that no tenant can have."""
    from prometheus_client import CollectorRegistry

    from adapters.format import validate_name
    from server.metrics import MAX_TENANT_LABELS, OTHER_TENANT, TenantMetrics

    tenants = TenantMetrics(CollectorRegistry())
    labels = [tenants.label(f"t{i}") for i in range(MAX_TENANT_LABELS + 10)]
    assert labels[:MAX_TENANT_LABELS] == [f"t{i}" for i in range(MAX_TENANT_LABELS)]
    assert set(labels[MAX_TENANT_LABELS:]) == {OTHER_TENANT} and tenants.label("t0") == "t0"
    with pytest.raises(ValueError):
        validate_name(OTHER_TENANT, "tenant")


def test_unknown_paths_and_refusals_are_counted_with_their_status(client):
    other_before = requests_served(client, "other", 404)
    refused_before = requests_served(client, "/v1/completions", 404)
    assert client.get("/no/such/path/123").status_code == 404
    response = client.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "x"})
    assert response.status_code == 404
    wait_for(lambda: requests_served(client, "other", 404) == other_before + 1, "404 on 'other' not counted")
    wait_for(
        lambda: requests_served(client, "/v1/completions", 404) == refused_before + 1, "refusal not counted"
    )


def test_lora_info_names_the_running_adapter_mid_stream(served, client):
    body = {"model": ADAPTER, "prompt": "Hi", "max_tokens": 1500, "stream": True, **GREEDY}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is generating now
        samples = scrape(client)
    wait_idle(served.engine)
    [(labels, seconds)] = samples[LORA_INFO].items()
    assert dict(labels) == {
        "running_lora_adapters": ADAPTER_ID, "waiting_lora_adapters": "", "max_lora": str(MAX_LORAS),
    }  # fmt: skip
    assert abs(seconds - time.time()) < 60
    assert value(samples, "loraplex_scheduler_running_requests") == 1
    assert value(samples, "loraplex_scheduler_waiting_requests") == 0
    assert 0 < value(samples, "loraplex_kv_cache_usage_ratio") <= 1
    # vLLM's names and meanings, labelled with the served model name (what llm-d's GIE routes on)
    vllm = {"model_name": BASE_MODEL}
    assert value(samples, "vllm:num_requests_running", **vllm) == 1
    assert value(samples, "vllm:num_requests_waiting", **vllm) == 0
    assert value(samples, "vllm:kv_cache_usage_perc", **vllm) == value(
        samples, "loraplex_kv_cache_usage_ratio"
    )
    idle = scrape(client)
    assert dict(next(iter(idle[LORA_INFO]))) == {
        "running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(MAX_LORAS),
    }  # fmt: skip
    assert value(idle, "loraplex_scheduler_running_requests") == 0


def test_adapter_tiers_loads_and_lookups_match_the_cache(served, client):
    complete(client, model=ADAPTER, prompt="Hey", max_tokens=2)
    wait_idle(served.engine)
    cache = served.engine.core.adapters
    samples = scrape(client)
    states = [cache.status(adapter_id).state for adapter_id in cache.registered_ids()]
    expected = {tier: sum(TIERS[state] == tier for state in states) for tier in TIERS.values()}
    assert {
        tier: value(samples, "loraplex_adapter_cache_adapters", tier=tier) for tier in expected
    } == expected
    assert expected["slot"] == 1 and expected["disk"] == 1  # the adapter used, the idle one
    assert value(samples, "loraplex_adapter_cache_loads_total") == cache.stats.num_loads == 1
    assert value(samples, "loraplex_adapter_cache_load_duration_seconds_count") == 1
    assert value(samples, "loraplex_adapter_cache_load_duration_seconds_sum") == pytest.approx(
        cache.stats.load_seconds_sum
    )
    assert value(samples, "loraplex_adapter_cache_hits_total", tier="host") >= 1  # copied into a slot
    assert value(samples, "loraplex_adapter_cache_host_bytes") == cache.host_bytes() > 0
    assert value(samples, "loraplex_adapter_cache_evictions_total", tier="slot") == 0


def test_exposition_parses_and_only_lora_info_names_adapters(served, client):
    complete(client, model=ADAPTER, prompt="Hey", max_tokens=2)
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    adapter_ids = set(served.engine.core.adapters.registered_ids())
    for name, family in families.items():
        assert name.startswith("loraplex_") or name in (LORA_INFO, *VLLM_GAUGES, *VLLM_PREFIX_COUNTERS), name
        if name == LORA_INFO:
            continue
        for sample in family.samples:
            assert set(sample.labels) <= BOUNDED_LABELS, (name, sample.labels)
            assert not any(a in v for a in adapter_ids for v in sample.labels.values()), sample
    assert set(families) >= set(EXPECTED_FAMILIES)


EXPECTED_FAMILIES = [
    "loraplex_http_requests", "loraplex_request_e2e_latency_seconds",
    "loraplex_request_time_to_first_token_seconds", "loraplex_request_inter_token_latency_seconds",
    "loraplex_engine_prompt_tokens", "loraplex_engine_generated_tokens", "loraplex_engine_step_adapters",
    "loraplex_engine_step_tokens", "loraplex_engine_step_duration_seconds",
    "loraplex_scheduler_waiting_requests", "loraplex_scheduler_running_requests",
    "loraplex_scheduler_preemptions", "loraplex_kv_cache_usage_ratio", "loraplex_adapter_cache_adapters",
    "loraplex_adapter_cache_hits", "loraplex_adapter_cache_misses", "loraplex_adapter_cache_evictions",
    "loraplex_adapter_cache_loads", "loraplex_adapter_cache_load_failures",
    "loraplex_adapter_cache_load_duration_seconds", "loraplex_adapter_cache_host_bytes", LORA_INFO,
    "loraplex_tenant_requests", "loraplex_tenant_prompt_tokens", "loraplex_tenant_generated_tokens",
    "loraplex_tenant_queue_seconds", "loraplex_tenant_virtual_tokens", "loraplex_tenant_limit_hits",
    *VLLM_GAUGES, *VLLM_PREFIX_COUNTERS, "loraplex_prefix_cache_blocks", "loraplex_prefix_cache_bytes",
    "loraplex_prefix_cache_evictions",
]  # fmt: skip


def test_each_app_has_its_own_registry(served):
    """A second app on the same engine starts from zero and does not see the first app's requests."""
    second = create_app(served.engine, BASE_MODEL)
    install(second, served.engine)
    with TestClient(second) as http:
        assert http.get("/health").status_code == 200
        text = http.get("/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    counted = [(s.labels, s.value) for s in samples if s.name == "loraplex_http_requests_total"]
    assert counted == [({"endpoint": "/health", "status": "200"}, 1.0)]
    assert [s.value for s in samples if s.name == "loraplex_request_e2e_latency_seconds_count"] == [0]


class RaisingEngine:
    """Just enough engine for a completion to reach ``encode``, which raises."""

    is_running = True

    def __init__(self) -> None:
        self.limits, self.tokenizer = EngineLimits(4, 64, 1, 8), None

    def add_step_observer(self, observer) -> None:  # never steps
        pass

    add_load_observer = add_step_observer

    def cache_lookups(self) -> CacheCounters:
        return CacheCounters()

    def encode(self, text: str) -> list[int]:
        raise RuntimeError("boom")


def test_an_unhandled_exception_counts_as_500_on_its_route():
    """Also: install asks nothing of a stub engine until /metrics reads the engine's state."""
    engine = RaisingEngine()
    app = create_app(engine, "base")
    metrics = install(app, engine)
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 500
    labels = {"endpoint": "/v1/completions", "status": "500"}
    assert metrics.registry.get_sample_value("loraplex_http_requests_total", labels) == 1


def test_metrics_auth_admin_asks_for_an_admin_key(tmp_path, tiny_llama_factory):
    """``--metrics-auth admin``: /metrics is 401 without a key, 403 for a user key, 200 for an admin;
    the default keeps it open, keys file or not."""
    from adapters.tenants import KeyRing, add_key

    keys_file = tmp_path / "keys.json"
    user, admin = add_key(keys_file, "acme", "user"), add_key(keys_file, "ops", "admin")
    engine = Engine(make_core(tiny_llama_factory(), max_loras=1))
    try:
        for metrics_auth, expected in (("admin", (401, 403, 200)), ("none", (200, 200, 200))):
            app = create_app(engine, "base", keyring=KeyRing.load(keys_file), metrics_auth=metrics_auth)
            with TestClient(app) as http:
                bearer = [{}] + [{"Authorization": f"Bearer {key}"} for key in (user, admin)]
                statuses = tuple(http.get("/metrics", headers=headers).status_code for headers in bearer)
                assert statuses == expected, metrics_auth
                if metrics_auth == "admin":
                    assert http.get("/metrics").json()["error"]["code"] == "invalid_api_key"
                    assert (
                        "loraplex_http_requests_total"
                        in http.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text
                    )
    finally:
        engine.shutdown()
