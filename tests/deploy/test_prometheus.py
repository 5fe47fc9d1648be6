"""deploy/prometheus: the config and rules pass promtool, the alert unit tests pass, every metric the
rules use is exposed by a real server, and a real Prometheus scrapes it and evaluates every rule.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.files import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    load_yaml,
    metric_names,
    tool,
)

# the alerts → the metric each must watch
REQUIRED_ALERTS = {
    "LoraplexDown": "up",
    "LoraplexHighErrorRate": "loraplex_http_requests_total",
    "LoraplexQueueSaturated": "loraplex_scheduler_waiting_requests",
    "LoraplexTimeToFirstTokenHigh": "loraplex_request_time_to_first_token_seconds_bucket",
    "LoraplexAdapterLoadFailures": "loraplex_adapter_cache_load_failures_total",
    "LoraplexKVCacheNearlyFull": "loraplex_kv_cache_usage_ratio",
}


def alert_rules() -> dict[str, dict]:
    rules = [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
    assert all("alert" in rule for rule in rules), "alerts.yml holds only alerting rules"
    named = {rule["alert"]: rule for rule in rules}
    assert len(named) == len(rules), "alert names are unique"
    return named


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


# ---- without a server ----
def test_metric_names_are_found_in_promql():
    expr = (
        'sum by (le, instance) (rate(foo_bucket{a="b}", c=~"$instance"}[$__rate_interval])) / bar offset 1h'
        " > 1e3 and on (instance) histogram_quantile(0.9, baz:rate5m) or vector(1) unless up == bool 0"
    )
    assert metric_names(expr) == {"foo_bucket", "bar", "baz:rate5m", "up"}


def test_every_required_alert_exists_and_watches_its_metric():
    rules = alert_rules()
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in rules, f"no alert {alert}"
        assert metric in metric_names(rules[alert]["expr"]), (alert, rules[alert]["expr"])
    for alert, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert


def test_scrape_config_points_at_the_metrics_path_and_loads_the_rules():
    config = load_yaml(PROMETHEUS_CONFIG)
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "loraplex"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [target.endswith(":8000") for c in job["static_configs"] for target in c["targets"]] == [True]
    rule_files = [(PROMETHEUS_CONFIG.parent / path).resolve() for path in config["rule_files"]]
    assert rule_files == [ALERTS.resolve()]
    for rule in alert_rules().values():  # the job label the rules select is this job's
        if 'job="' in rule["expr"]:
            assert 'job="loraplex"' in rule["expr"], rule["expr"]


def test_promtool_accepts_the_config_and_the_rules():
    for args in (("check", "config", str(PROMETHEUS_CONFIG)), ("check", "rules", str(ALERTS))):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in promtool("check", "rules", str(ALERTS)).stdout


def test_alert_unit_tests_pass():
    """alerts_test.yml: each alert fires on a misbehaving instance, at the time its `for` allows."""
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    groups = load_yaml(ALERTS_TEST)["tests"]
    tested = {test["alertname"] for group in groups for test in group["alert_rule_test"]}
    assert tested == set(alert_rules())


# ---- against a real server ----
def test_every_metric_in_the_rules_is_exposed_by_the_server(served):
    for alert, rule in alert_rules().items():
        names = metric_names(rule["expr"])
        assert names, f"{alert}: no metric found in {rule['expr']!r}"
        unknown = sorted(names - served.sample_names - PROMETHEUS_SERIES)
        assert not unknown, f"{alert} uses metrics the server does not expose: {unknown}"


def test_a_real_prometheus_scrapes_the_server_and_evaluates_every_rule(prometheus):
    """deploy/prometheus/prometheus.yml with the target, intervals and rule path made local."""
    scraped = prometheus.wait_for(
        lambda: prometheus.query("loraplex_http_requests_total") or None, "no series scraped"
    )
    assert {series["metric"]["job"] for series in scraped} == {"loraplex"}
    assert {s["metric"]["endpoint"] for s in scraped} >= {"/v1/completions", "/metrics"}
    [up] = prometheus.query('up{job="loraplex"}')
    assert up["value"][1] == "1"
    count = len(alert_rules())
    rules = prometheus.wait_for(lambda: prometheus.rules_once_evaluated(count), "rules not evaluated")
    assert {rule["name"] for rule in rules} == set(alert_rules())
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    assert {rule["name"]: rule["state"] for rule in rules}["LoraplexDown"] == "inactive"
