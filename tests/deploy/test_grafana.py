"""deploy/grafana: the provisioning files and the dashboard JSON; every panel query uses only metrics
the server exposes, parses as PromQL (promtool) and runs on a real Prometheus.
"""

from __future__ import annotations

import json
import subprocess
from urllib.parse import urlsplit

import pytest

from tests.deploy.files import (
    COMPOSE_FILE,
    DASHBOARD,
    GRAFANA_PROVISIONING,
    PROMETHEUS_SERIES,
    for_promql_tools,
    load_yaml,
    metric_names,
    tool,
)

# what the issue asks the dashboard to show → a metric that must appear in some panel for it
REQUIRED_METRICS = {
    "request rate and errors": "loraplex_http_requests_total",
    "generated tokens/s": "loraplex_engine_generated_tokens_total",
    "TTFT": "loraplex_request_time_to_first_token_seconds_bucket",
    "ITL": "loraplex_request_inter_token_latency_seconds_bucket",
    "queue depth": "loraplex_scheduler_waiting_requests",
    "running batch size": "loraplex_scheduler_running_requests",
    "KV usage": "loraplex_kv_cache_usage_ratio",
    "adapters per tier": "loraplex_adapter_cache_adapters",
    "cache hit rate": "loraplex_adapter_cache_misses_total",
    "adapter load latency": "loraplex_adapter_cache_load_duration_seconds_bucket",
    "merged copies": "loraplex_merge_copies",
    "merged vs side-path tokens": "loraplex_merge_tokens_total",
    "prefix cache hit rate": "vllm:prefix_cache_hits_total",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels of collapsed rows
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query target."""
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def datasource_uid() -> str:
    [source] = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    return source["uid"]


def test_the_datasource_is_the_compose_prometheus():
    [source] = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(source["url"])
    services = load_yaml(COMPOSE_FILE)["services"]
    assert url.hostname in services and services[url.hostname]["image"].startswith("prom/prometheus")
    assert url.port == 9090 and source["access"] == "proxy" and source["isDefault"] is True


def test_the_dashboard_provider_reads_the_folder_compose_mounts():
    [provider] = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "loraplex.yml")["providers"]
    assert provider["type"] == "file"
    mounts = load_yaml(COMPOSE_FILE)["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert f"./{GRAFANA_PROVISIONING.relative_to(COMPOSE_FILE.parent)}:/etc/grafana/provisioning:ro" in mounts


def test_panels_are_well_formed_and_use_the_provisioned_datasource():
    uid = datasource_uid()
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_every_required_view_is_on_the_dashboard():
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    missing = {view: metric for view, metric in REQUIRED_METRICS.items() if metric not in used}
    assert not missing


def test_latency_panels_show_p50_and_p99():
    for title in ("Time to first token", "Inter-token latency"):
        [panel] = [p for p in panels() if p["title"] == title]
        quantiles = [target["expr"].split(",")[0] for target in panel["targets"]]
        assert quantiles == ["histogram_quantile(0.5", "histogram_quantile(0.99"], title


def test_every_query_parses_as_promql(tmp_path):
    """promtool parses each expression (template variables substituted) as a recording rule."""
    yaml = pytest.importorskip("yaml")
    promtool = tool("promtool")
    exprs = [for_promql_tools(expr) for _, expr in queries()]
    rules = [{"record": f"panel:{i}", "expr": expr} for i, expr in enumerate(exprs)]
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_every_metric_on_the_dashboard_is_exposed_by_the_server(served):
    for title, expr in queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        unknown = sorted(names - served.sample_names - PROMETHEUS_SERIES)
        assert not unknown, f"panel {title!r} uses metrics the server does not expose: {unknown}"
    for variable in dashboard()["templating"]["list"]:
        metric = variable["query"]["query"].removeprefix("label_values(").split(",")[0].strip()
        assert metric in served.sample_names, variable["name"]


def test_every_query_runs_on_a_real_prometheus(prometheus):
    requests_by_status = for_promql_tools(queries()[0][1])
    series = prometheus.wait_for(lambda: prometheus.query(requests_by_status) or None, "no request rate")
    # by status: the completion the `served` fixture made, and whatever other deploy tests sent it
    assert {"status": "200"} in [s["metric"] for s in series]
    assert all(set(s["metric"]) == {"status"} for s in series), series
    for _, expr in queries():
        prometheus.query(for_promql_tools(expr))  # asserts the query succeeds
