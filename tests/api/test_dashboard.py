"""``GET /v1/stats`` and the ``/dashboard`` files: admin-only, exact figures after real traffic.

In-process app (Starlette's TestClient) on a real Engine over a tiny Llama, a real SQLite store,
adapters saved by peft, and a keys file with two tenants and an admin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters.store import SQLiteAdapterStore
from adapters.tenants import KeyRing, add_key
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.engine.engine import Engine
from server.settings import SERVE_OPTIONS, settings_echo
from server.stats import BUCKET_S
from tests.engine.test_engine_parity import save_peft_adapter

BASE = "tiny"


class Api:
    def __init__(self, client: TestClient, keys: dict[str, str], engine: Engine, adapter_dir: Path) -> None:
        self.client, self.keys, self.engine, self.adapter_dir = client, keys, engine, adapter_dir

    def call(self, who: str | None, method: str, path: str, **kwargs):
        headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
        return self.client.request(method, path, headers=headers, **kwargs)

    def stats(self, **params) -> dict:
        response = self.call("admin", "GET", "/v1/stats", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def complete(self, who: str, model: str, max_tokens: int, stream: bool = False) -> int:
        """Completion tokens generated, from the usage the server reports (streamed: the last chunk)."""
        body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        response = self.call(who, "POST", "/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if stream:
            chunks = [
                json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
            ]
            return chunks[-1]["usage"]["completion_tokens"]
        return response.json()["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_llama_dir) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("dashboard")
    adapter = save_peft_adapter(
        tiny_llama_dir, root / "bot", seed=3, r=4, target_modules=["q_proj", "v_proj"]
    )
    keys_file = root / "keys.json"
    keys = {who: add_key(keys_file, tenant, role) for who, tenant, role in
            (("acme", "acme", "user"), ("globex", "globex", "user"), ("admin", "ops", "admin"))}  # fmt: skip
    config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=256,
                          merge_policy="off", max_cpu_adapters_bytes=1)  # fmt: skip  # no host tier: loads
    model_config = ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu")
    engine = Engine.from_config(model_config, config)
    registry = engine.open_registry(SQLiteAdapterStore(root / "data"))
    echo = settings_echo(
        model_config, config, ServerConfig(), {"served_model_name": BASE, "keys_file": keys_file}
    )
    app = create_app(engine, BASE, registry, KeyRing.load(keys_file), settings=echo)
    with TestClient(app) as client:
        api = Api(client, keys, engine, adapter)
        files = [("files", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir()) if p.suffix != ".md"]
        for name in ("bot", "quiet-one"):
            uploaded = api.call("acme", "POST", "/v1/adapters", data={"name": name}, files=files)
            assert uploaded.status_code == 201, uploaded.text
        yield api
    engine.shutdown()


def test_stats_need_an_admin_key(api):
    assert api.call(None, "GET", "/v1/stats").status_code == 401
    denied = api.call("acme", "GET", "/v1/stats")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"


def test_config_echoes_the_settings_the_app_was_started_with(api):
    config = api.stats()["config"]
    assert {option.flag for option in SERVE_OPTIONS} | {"adapter"} <= set(config)
    assert config["max-loras"] == 2 != EngineConfig.max_loras  # not the default: the app's own
    assert (config["merge-policy"], config["dtype"], config["served-model-name"]) == ("off", "float32", BASE)
    assert config["keys-file"].endswith("keys.json") and config["port"] == 8000  # a path as a string
    assert config["target-modules"] == list(EngineConfig.target_modules)  # flagless ones too, tuples as lists
    assert config["max-merged-bytes"] is None and config["adapter"] == {}


def test_figures_after_real_traffic(api):
    before = api.stats(window=900)
    time.sleep(BUCKET_S)  # what came before is in whole buckets
    before_tokens_in_series = (
        sum(api.stats(window=300)["series"]["tokens_per_s"]) * BUCKET_S
    )  # 1 bucket/point
    bot_tokens = api.complete("acme", "bot", 6) + api.complete("acme", "bot", 5, stream=True)
    base_tokens = api.complete("globex", BASE, 3)
    missing = api.call("globex", "POST", "/v1/completions", json={"model": "bot", "prompt": "x"})
    assert missing.status_code == 404  # acme's adapter is invisible to globex: an error, and no activity

    stats = api.stats(window=900, top=5)
    totals = stats["totals"]
    assert totals["requests"] - before["totals"]["requests"] == 4
    assert totals["errors"] - before["totals"]["errors"] == 1
    assert totals["generated_tokens"] - before["totals"]["generated_tokens"] == bot_tokens + base_tokens == 14
    assert totals["tokens_per_s"] > 0 and totals["ttft"]["p50_s"] > 0 and totals["itl"]["p99_s"] > 0
    busiest = {a["id"]: a for a in stats["adapters"]["busiest"]}
    bot = busiest["acme/bot@1"]
    assert (bot["tenant"], bot["name"], bot["version"], bot["requests"], bot["tokens"]) == (
        "acme",
        "bot",
        1,
        2,
        11,
    )
    assert bot["tier"] in ("slot", "host") and not bot["merged"]
    assert busiest[BASE]["tenant"] is None and busiest[BASE]["tokens"] == 3
    assert "acme/quiet-one@1" not in busiest, "no traffic, not busy"
    tenants = {t["tenant"]: t for t in stats["tenants"]}
    assert (tenants["acme"]["requests"], tenants["acme"]["tokens"]) == (2, 11)
    assert (tenants["globex"]["requests"], tenants["globex"]["tokens"]) == (1, 3)
    assert tenants["acme"]["limit_hits"] == 0 and tenants["acme"]["limits"] == "-"
    assert tenants["acme"]["queue_s_mean"] >= 0  # both of acme's requests were admitted
    assert stats["adapters"]["registered"] == 2 and sum(stats["adapters"]["tiers"].values()) == 2
    assert stats["adapters"]["loads"] >= 1 and stats["adapters"]["load_p50_s"] > 0
    assert stats["adapters"]["slot_loads"] >= stats["adapters"]["loads"], "each read adapter went into a slot"
    time.sleep(BUCKET_S)  # series end with the last bucket that is over
    series = api.stats(window=300)["series"]
    assert sum(series["tokens_per_s"]) * BUCKET_S == pytest.approx(14 + before_tokens_in_series)
    assert max(series["running"]) >= 1 and max(v for v in series["ttft_p99_s"] if v is not None) > 0
    assert len({len(v) for v in series.values()}) == 1, "every series has one value per point"


def test_top_limits_and_search_finds_idle_adapters(api):
    api.complete("acme", "bot", 2)
    assert len(api.stats(top=1)["adapters"]["busiest"]) == 1
    found = api.stats(search="QUIET")["adapters"]
    assert found["matches_total"] == 1
    (quiet,) = found["matches"]
    assert (quiet["id"], quiet["tokens"], quiet["tier"]) == ("acme/quiet-one@1", 0, "disk")
    both = api.stats(search="acme/", top=1)["adapters"]
    assert both["matches_total"] == 2 and [m["id"] for m in both["matches"]] == ["acme/bot@1"], (
        "busiest first"
    )
    assert api.stats()["adapters"]["matches"] is None
    assert api.stats(search="<script>")["adapters"]["matches"] == []


def test_merged_copies_are_listed(api):
    merged = api.call("admin", "POST", "/v1/adapters/bot/merge", params={"tenant": "acme"})
    assert merged.status_code == 200, merged.text
    try:
        copies = api.stats()["adapters"]["merged"]
        assert [(c["id"], c["pinned"]) for c in copies] == [("acme/bot@1", True)] and copies[0]["bytes"] > 0
        found = api.stats(search="bot")["adapters"]["matches"]
        assert [m["merged"] for m in found if m["id"] == "acme/bot@1"] == [True]
    finally:
        assert (
            api.call("admin", "POST", "/v1/adapters/bot/unmerge", params={"tenant": "acme"}).status_code
            == 200
        )


def test_thousands_of_adapters_stay_a_small_answer(api):
    cache = api.engine.core.adapters
    bulk = [f"bulk/adapter-{i:04d}@1" for i in range(5000)]
    for adapter_id in bulk:  # registered like the store does at start: on disk, read on first use
        cache.register(adapter_id, api.adapter_dir)
    try:
        response = api.call("admin", "GET", "/v1/stats", params={"search": "bulk/"})
        assert response.status_code == 200
        assert len(response.content) < 40_000, "top-N lists and a bounded series, whatever the registry holds"
        adapters = response.json()["adapters"]
        assert adapters["registered"] == 5002 and adapters["tiers"]["disk"] >= 5000
        assert adapters["matches_total"] == 5000 and len(adapters["matches"]) == 10
        (one,) = api.stats(search="ADAPTER-4242")["adapters"]["matches"]
        assert (one["id"], one["tenant"], one["name"], one["version"]) == (
            bulk[4242],
            "bulk",
            "adapter-4242",
            1,
        )
    finally:
        for adapter_id in bulk:
            cache.unregister(adapter_id)


@pytest.mark.parametrize(
    "params, param",
    [({"window": 5}, "window"), ({"window": 10_000}, "window"), ({"window": "soon"}, "window"),
     ({"top": 0}, "top"), ({"top": 101}, "top"), ({"search": "x" * 201}, "search")],
)  # fmt: skip
def test_bad_parameters_are_400_naming_the_parameter(api, params, param):
    response = api.call("admin", "GET", "/v1/stats", params=params)
    assert response.status_code == 400, response.text
    assert param in response.json()["error"]["param"]


def test_dashboard_page_and_assets(api):
    page = api.call(None, "GET", "/dashboard")  # the page holds no data; /v1/stats needs the key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert '<script src="/dashboard/dashboard.js"' in page.text and "<script>" not in page.text
    script = api.call(None, "GET", "/dashboard/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script.text, f"{sink}: server values are set as text, never parsed as HTML"
    assert api.call(None, "GET", "/dashboard/dashboard.css").headers["content-type"].startswith("text/css")
    for bad in (
        "/dashboard/index.py",
        "/dashboard/..%2fapp.py",
        "/dashboard/%2e%2e%2f%2e%2e%2fpyproject.toml",
    ):
        response = api.call(None, "GET", bad)
        assert response.status_code == 404 and "error" in response.json(), bad
