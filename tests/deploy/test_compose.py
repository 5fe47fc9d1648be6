"""docker-compose.yml: valid against the compose-spec JSON schema, and its parts fit together: the
server's arguments parse, its store is on a named volume, its keys come from a declared secret,
Prometheus and Grafana get their files from deploy/, and Prometheus scrapes the loraplex service.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import pytest

from tests.deploy import files
from tests.deploy.files import (
    COMPOSE_FILE,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    dockerfile_stages,
    exec_form,
    load_yaml,
    serve_options,
)


def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def loraplex_options(service: dict) -> dict[str, object]:
    """``loraplex serve`` as the container runs it: the image's entrypoint, ENV, then compose's."""
    _, stages = dockerfile_stages()
    [entrypoint] = stages[-1].all("ENTRYPOINT")
    assert exec_form(entrypoint)[:2] == ["loraplex", "serve"]
    environ = {**stages[-1].env(), **service.get("environment", {})}
    return serve_options([*exec_form(entrypoint)[2:], *service["command"]], environ)


def seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s or 1h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def compose_spec_validator():
    """The compose-spec schema check-jsonschema ships (vendor.compose-spec), with jsonschema."""
    pytest.importorskip("check_jsonschema", reason="the compose-spec schema comes with check-jsonschema")
    jsonschema = pytest.importorskip("jsonschema")
    path = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(path.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_the_compose_file_is_valid_against_the_compose_spec():
    validator = compose_spec_validator()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors
    broken = copy.deepcopy(compose())
    broken["services"]["loraplex"]["stop_grace_period"] = {"seconds": 45}  # the schema does reject things
    assert not validator.is_valid(broken)


def test_the_three_services_exist():
    services = compose()["services"]
    assert set(services) == {"loraplex", "prometheus", "grafana"}
    assert services["loraplex"]["build"]["context"] == "."
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_the_server_arguments_parse_and_keep_the_store_on_a_named_volume():
    document = compose()
    service = document["services"]["loraplex"]
    options = loraplex_options(service)
    assert options["host"] == "0.0.0.0"
    assert f"{options['port']}:{options['port']}" in service["ports"]
    named = {}
    for mount in service["volumes"]:
        source, target = mount.split(":")[:2]
        named[target] = source
    assert named[str(options["data_dir"])] in document["volumes"], "the data dir is a declared named volume"


def test_the_keys_file_is_a_declared_secret_kept_out_of_git():
    document = compose()
    service = document["services"]["loraplex"]
    [secret] = service["secrets"]
    assert secret in document["secrets"]
    assert str(loraplex_options(service)["keys_file"]) == f"/run/secrets/{secret}"
    secret_file = REPO_ROOT / document["secrets"][secret]["file"]
    ignore = (secret_file.parent / ".gitignore").read_text().splitlines()
    assert "*" in ignore, f"{secret_file.parent} must keep its keys files out of git"


def test_stopping_waits_longer_than_the_drain():
    service = compose()["services"]["loraplex"]
    assert seconds(service["stop_grace_period"]) > float(loraplex_options(service)["drain_timeout"]) + 5


def test_every_named_volume_is_declared_and_every_bind_mount_exists():
    files.assert_volumes_declared_and_bind_mounts_exist(compose(), REPO_ROOT)


def test_prometheus_scrapes_the_loraplex_service_with_the_config_from_deploy():
    document = compose()
    service = document["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in service["volumes"]
    assert f"--config.file=/etc/prometheus/{PROMETHEUS_CONFIG.name}" in service["command"]
    [job] = [job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if job["job_name"] == "loraplex"]
    [target] = [target for config in job["static_configs"] for target in config["targets"]]
    port = loraplex_options(document["services"]["loraplex"])["port"]
    assert target == f"loraplex:{port}"
