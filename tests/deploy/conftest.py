"""A real ``loraplex serve`` process on a tiny random Llama, whose /metrics the deployment files are
checked against (a metric renamed in server/metrics.py fails the alert and dashboard tests), and a
real Prometheus scraping it when the binary is installed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.server_process import free_port, running_server, stop
from tests.deploy.files import ALERTS, PROMETHEUS_CONFIG, load_yaml, tool

T = TypeVar("T")
BASE_MODEL = "tiny"
PROMETHEUS_TIMEOUT_S = 60


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:<port>
    sample_names: frozenset[str]  # every sample name of one /metrics scrape (…_total, …_bucket, …)
    family_names: frozenset[str]  # its metric families (counters without _total; no *_created gauges)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port


@pytest.fixture(scope="session")
def served(tiny_llama_dir, tmp_path_factory) -> Iterator[Served]:
    """The server after one completion, so labelled series (HTTP requests by status) exist too."""
    root = tmp_path_factory.mktemp("deploy-server")
    args = [
        "--model", str(tiny_llama_dir), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--dtype", "float32", "--device", "cpu", "--drain-timeout", "2",
    ]  # fmt: skip
    with running_server(args, root / "server.log") as server:
        body = {"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        families = list(text_string_to_metric_families(text))
        names = {sample.name for family in families for sample in family.samples}
        family_names = {family.name for family in families}
        created = {name for name in family_names if name.removesuffix("_created") in family_names - {name}}
        yield Served(server.url, frozenset(names), frozenset(family_names - created))


class PrometheusApi:
    """A running Prometheus's HTTP API (``/api/v1``)."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: Path) -> None:
        self.url, self.process, self.log_path = url, process, log_path

    def wait_for(self, probe: Callable[[], T | None], message: str) -> T:
        """The first non-None result of ``probe``; pytest.fail if Prometheus exits or time runs out."""
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if (result := probe()) is not None:
                    return result
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{message} after {PROMETHEUS_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def is_ready(self) -> bool:
        """``/-/ready``: 200 once the TSDB is open and queries are answered (503 before)."""
        return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200

    def get(self, path: str, **params: str) -> dict:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def rules_once_evaluated(self, count: int) -> list[dict] | None:
        """All rules once ``count`` of them exist and each has been evaluated, else None."""
        rules = [rule for group in self.get("/api/v1/rules")["groups"] for rule in group["rules"]]
        evaluated = [rule for rule in rules if not rule["lastEvaluation"].startswith("0001-")]
        return rules if len(rules) == count and len(evaluated) == count else None


@pytest.fixture(scope="session")
def prometheus(served, tmp_path_factory) -> Iterator[PrometheusApi]:
    """A real Prometheus (the `prometheus` binary) run with deploy/prometheus/prometheus.yml, its
    target made the test server, intervals 1 s, storage in tmp; skipped when not installed."""
    yaml = pytest.importorskip("yaml")
    binary = tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "loraplex"]
    target = f"127.0.0.1:{served.port}"
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
    config_path = root / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    command = [
        binary, f"--config.file={config_path}", f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address={address}",
    ]  # fmt: skip
    log_path = root / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        api = PrometheusApi(f"http://{address}", process, log_path)
        api.wait_for(lambda: api.is_ready() or None, "prometheus not ready")
        yield api
    finally:
        stop(process)
