"""deploy/compose/replicas.yml: two loraplex replicas over one shared catalogue (PostgreSQL + MinIO),
nginx in front, Prometheus scraping each replica. Valid against the compose-spec schema, and its
parts fit together: the replicas' arguments parse, their store URL names the postgres service with
its user and database, the credentials each side reads are the same variables, the bucket the
one-shot job creates is the one the replicas use, boto3 reaches the MinIO service with the
replicas' environment, nginx balances over exactly the replicas (run for real in front of a real
server where nginx is installed) and Prometheus scrapes each of them.
"""

from __future__ import annotations

import copy
import getpass
import json
import os
import re
import shlex
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.server_process import free_port, stop
from tests.deploy import files
from tests.deploy.conftest import BASE_MODEL
from tests.deploy.files import (
    ALERTS,
    COMPOSE_FILE,
    COMPOSE_REPLICAS,
    NGINX_CONF,
    PROMETHEUS_REPLICAS_CONFIG,
    REPO_ROOT,
    compose_variables,
    image_options,
    interpolate,
    load_yaml,
    pyproject_extras,
    tool,
)
from tests.deploy.test_compose import compose_spec_validator, seconds

COMPOSE_DIR = COMPOSE_REPLICAS.parent  # compose resolves the file's relative paths from here
STORE_ENV = (
    "PGPASSWORD",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


def raw() -> dict:
    return load_yaml(COMPOSE_REPLICAS)


def compose(environ: dict[str, str] | None = None) -> dict:
    """The file as ``docker compose`` sees it with ``environ`` (default: nothing set)."""
    return interpolate(raw(), environ or {})


def replicas(document: dict) -> dict[str, dict]:
    """The loraplex services: those built from the repository's Dockerfile."""
    found = {name: s for name, s in document["services"].items() if "build" in s}
    assert found, "no service is built from the Dockerfile"
    return found


def options(service: dict) -> dict[str, object]:
    return image_options(service["command"], service.get("environment", {}))


def named_mounts(service: dict) -> dict[str, str]:
    """Container path → named volume or bind source."""
    return {mount.split(":")[1]: mount.split(":")[0] for mount in service.get("volumes", [])}


def test_the_file_is_valid_against_the_compose_spec():
    validator = compose_spec_validator()
    for document in (raw(), compose()):
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)
        ]
        assert not errors
    broken = copy.deepcopy(compose())
    broken["services"]["postgres"]["depends_on"] = {"minio": {"condition": "started"}}  # not a condition
    assert not validator.is_valid(broken)


def test_docker_compose_accepts_the_file():
    docker = tool("docker")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_REPLICAS), "config", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_services_two_replicas_and_their_dependencies():
    services = compose()["services"]
    assert set(services) == {"loraplex-1", "loraplex-2", "nginx", "postgres", "minio", "minio-bucket",
                             "prometheus", "grafana"}  # fmt: skip
    assert set(replicas(compose())) == {"loraplex-1", "loraplex-2"}
    for service in replicas(compose()).values():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    assert services["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio-bucket"]["restart"] == "no"  # a one-shot job, not restarted after it exits 0
    for name in ("postgres", "minio"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_every_image_is_pinned_and_the_replicas_are_built_with_the_shared_extra():
    for name, service in compose()["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"{name}: pin {image} to a version"
    extras = pyproject_extras()
    for name, service in replicas(compose()).items():
        build = service["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO_ROOT, name
        named = build["args"]["EXTRAS"].split(",")
        assert set(named) <= set(extras) and "shared" in named, f"{name}: EXTRAS {named}"
    assert {service["image"] for service in replicas(compose()).values()} == {"loraplex:shared"}


def test_the_replicas_serve_one_shared_catalogue_on_their_own_data_dirs():
    document = compose()
    seen = []
    for name, service in replicas(document).items():
        resolved = options(service)
        assert resolved["host"] == "0.0.0.0" and resolved["adapters"] == {}, name
        store, blobs = str(resolved["adapter_store"]), str(resolved["adapter_blobs"])
        assert urlsplit(store).scheme == "postgresql" and urlsplit(blobs).scheme == "s3", name
        assert urlsplit(store).password is None, f"{name}: the password belongs in PGPASSWORD, not the URL"
        volume = named_mounts(service)[str(resolved["data_dir"])]
        assert volume in document["volumes"], f"{name}: --data-dir is a declared named volume"
        assert f"127.0.0.1:{8000 + len(seen) + 1}:{resolved['port']}" in service["ports"], name
        seen.append((store, blobs, volume))
    assert len({(store, blobs) for store, blobs, _ in seen}) == 1, "every replica names the same catalogue"
    assert len({volume for _, _, volume in seen}) == len(seen), "each replica has its own data dir"


def test_the_store_url_names_the_postgres_service_user_database_and_password():
    for environ in ({}, {"POSTGRES_PASSWORD": "s3cret"}):
        document = compose(environ)
        postgres = document["services"]["postgres"]["environment"]
        for service in replicas(document).values():
            url = urlsplit(str(options(service)["adapter_store"]))
            assert url.hostname in document["services"] and url.hostname == "postgres"
            assert (url.port or 5432) == 5432  # the official image's port
            assert url.username == postgres["POSTGRES_USER"] and url.path == f"/{postgres['POSTGRES_DB']}"
            assert service["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
        assert postgres["POSTGRES_PASSWORD"] == environ.get(
            "POSTGRES_PASSWORD", postgres["POSTGRES_PASSWORD"]
        )
    check = compose()["services"]["postgres"]["healthcheck"]["test"]
    postgres = compose()["services"]["postgres"]["environment"]
    assert (
        check[1] == "pg_isready" and postgres["POSTGRES_USER"] in check and postgres["POSTGRES_DB"] in check
    )


def minio_endpoint(document: dict) -> tuple[str, int]:
    """(service name, port) of the S3 API MinIO serves (its --address)."""
    command = document["services"]["minio"]["command"]
    address = command[command.index("--address") + 1]
    return "minio", int(address.rpartition(":")[2])


def test_the_bucket_and_credentials_are_minios():
    environ = {"MINIO_ROOT_USER": "ops", "MINIO_ROOT_PASSWORD": "another-secret"}
    document = compose(environ)
    minio = document["services"]["minio"]["environment"]
    host, port = minio_endpoint(document)
    job = document["services"]["minio-bucket"]
    script = " ".join(job["command"])
    alias, alias_url = re.search(r"mc alias set (\S+) (\S+) ", script).groups()
    assert urlsplit(alias_url).hostname == host and urlsplit(alias_url).port == port
    created = re.findall(rf"mc mb (?:--\S+ )*{re.escape(alias)}/([a-z0-9.-]+)", script)
    assert job["environment"] == minio  # the job logs in with MinIO's own credentials
    for name, service in replicas(document).items():
        env = service["environment"]
        endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
        assert (endpoint.hostname, endpoint.port) == (host, port), name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("ops", "another-secret"), name
        assert env["AWS_DEFAULT_REGION"], name
        assert urlsplit(str(options(service)["adapter_blobs"])).hostname in created, (
            f"{name}: bucket not created"
        )


def test_boto3_reaches_the_minio_service_with_the_replicas_environment(monkeypatch):
    """The client adapters/blobs.py makes from the environment addresses http://minio:9000/BUCKET/...
    (path style): a virtual-hosted BUCKET.minio would not resolve on the compose network."""
    pytest.importorskip("boto3")
    from adapters.blobs import S3Blobs

    for name, service in replicas(compose()).items():
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key in STORE_ENV:
            monkeypatch.setenv(key, service["environment"][key])
        blobs = S3Blobs(str(options(service)["adapter_blobs"]))
        sent: list[str] = []

        def capture(request, sent=sent, **_):
            sent.append(request.url)
            raise ConnectionAbortedError("stop before the network")

        blobs._client.meta.events.register("before-send", capture)
        with pytest.raises(Exception):  # noqa: B017 (whatever botocore makes of the abort)
            blobs._client.head_object(Bucket=blobs.bucket, Key=blobs.key("default", "a", 1))
        host, port = minio_endpoint(compose())
        assert sent and sent[0].startswith(f"http://{host}:{port}/{blobs.bucket}/"), (name, sent)


def test_every_variable_has_a_default_and_no_secret_is_written_literally():
    for name, default in compose_variables(raw()).items():
        assert default, f"${{{name}}} needs a default for a local try-out (or use :? to require it)"
    for service_name, service in raw()["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert re.fullmatch(r"\$\{\w+:-[^}]+\}", str(value)), f"{service_name}: {key} is hard-coded"
    passwords = {
        n: d for n, d in compose_variables(raw()).items() if "PASSWORD" in n and n != "GRAFANA_ADMIN_PASSWORD"
    }
    assert passwords and all(str(d).startswith("local-only-") for d in passwords.values()), passwords
    assert (
        compose_variables(raw())["GRAFANA_ADMIN_PASSWORD"]
        == compose_variables(load_yaml(COMPOSE_FILE))["GRAFANA_ADMIN_PASSWORD"]
    )


def test_the_keys_file_is_the_same_git_ignored_secret_as_docker_compose_yml():
    document = compose()
    for service in replicas(document).values():
        [secret] = service["secrets"]
        assert str(options(service)["keys_file"]) == f"/run/secrets/{secret}"
        path = (COMPOSE_DIR / document["secrets"][secret]["file"]).resolve()
        single = load_yaml(COMPOSE_FILE)["secrets"]["loraplex_keys"]["file"]
        assert path == (REPO_ROOT / single).resolve()
        assert "*" in (path.parent / ".gitignore").read_text().splitlines()


def test_stopping_waits_longer_than_the_drain():
    for name, service in replicas(compose()).items():
        assert seconds(service["stop_grace_period"]) > float(options(service)["drain_timeout"]) + 5, name


def test_every_named_volume_is_declared_and_every_bind_mount_exists():
    files.assert_volumes_declared_and_bind_mounts_exist(compose(), COMPOSE_DIR)


# ---- nginx ----
def nginx_upstream() -> list[str]:
    text = NGINX_CONF.read_text()
    block = re.search(r"upstream loraplex \{(.*?)\}", text, flags=re.S)[1]
    return re.findall(r"^\s*server\s+(\S+)", block, flags=re.M)


def nginx_directive(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), flags=re.M)


def test_nginx_balances_over_exactly_the_replicas_and_publishes_the_api_port():
    document = compose()
    expected = {f"{name}:{options(service)['port']}" for name, service in replicas(document).items()}
    assert sorted(nginx_upstream()) == sorted(expected)
    nginx = document["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    [listen] = nginx_directive("listen")
    assert f"{listen}:{listen}" in nginx["ports"]
    assert set(nginx["depends_on"]) == set(replicas(document))


def test_nginx_streams_and_takes_adapter_uploads():
    assert nginx_directive("proxy_buffering") == ["off"]  # SSE tokens are not held back
    [size] = nginx_directive("client_max_body_size")
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()
    assert int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] >= 2**30
    [next_upstream] = nginx_directive("proxy_next_upstream")
    assert {"http_503", "non_idempotent"} <= set(next_upstream.split())
    assert "timeout" not in next_upstream.split(), "a slow generation must not be run twice"


class _Draining(BaseHTTPRequestHandler):
    """A replica that is draining: 503 to everything, as loraplex answers after SIGTERM."""

    def _refuse(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {"error": {"message": "draining", "type": "server_error", "code": "draining"}}
        ).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def nginx(served, tmp_path_factory):
    """deploy/compose/nginx.conf run by a real nginx, its upstream made a draining stub and the real
    test server (Debian's nginx may predate the `resolve` parameter, which needs Docker's DNS)."""
    binary = tool("nginx")
    root = tmp_path_factory.mktemp("nginx")
    draining = ThreadingHTTPServer(("127.0.0.1", 0), _Draining)
    threading.Thread(target=draining.serve_forever, daemon=True).start()
    port = free_port()
    text = NGINX_CONF.read_text()
    targets = iter([f"127.0.0.1:{draining.server_address[1]}", f"127.0.0.1:{served.port}"])
    text = re.sub(r"^(\s*server\s+)\S+ resolve", lambda m: m[1] + next(targets), text, flags=re.M)
    text = re.sub(r"^(\s*listen\s+)\d+;", rf"\g<1>127.0.0.1:{port};", text, flags=re.M)
    (root / "default.conf").write_text(text)
    temp = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (root / "nginx.conf").write_text(
        f"user {getpass.getuser()};\npid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} info;\n"
        f"daemon off;\nevents {{}}\nhttp {{\n access_log off;\n {temp}\n"
        f" include {root / 'default.conf'};\n}}\n"
    )
    command = [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    root / "error.log"
                ).read_text()
                time.sleep(0.2)
        yield url
    finally:
        stop(process)
        draining.shutdown()


def test_through_nginx_a_draining_replica_hands_every_request_to_the_other(nginx):
    for _ in range(6):  # least_conn alternates between the idle upstreams: half land on the stub first
        assert httpx.get(f"{nginx}/health", timeout=10).status_code == 200
        body = {"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        response = httpx.post(f"{nginx}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text


def test_through_nginx_streams_arrive_whole_metrics_stay_per_replica_and_uploads_reach_the_server(nginx):
    body = {"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{nginx}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert httpx.get(f"{nginx}/metrics", timeout=10).status_code == 404
    files = [("files", ("adapter_model.safetensors", b"\0" * (3 * 2**20)))]  # over nginx's 1 MiB default
    response = httpx.post(f"{nginx}/v1/adapters", data={"name": "x"}, files=files, timeout=60)
    assert response.status_code != 413, "nginx refused the upload"
    assert 400 <= response.status_code < 500 and "error" in response.json(), (
        response.text
    )  # loraplex's answer


# ---- Prometheus ----
def test_prometheus_scrapes_each_replica_with_the_alert_rules():
    document = compose()
    service = document["services"]["prometheus"]
    assert named_mounts(service)["/etc/prometheus"] == "../prometheus"
    assert (COMPOSE_DIR / "../prometheus").resolve() == PROMETHEUS_REPLICAS_CONFIG.parent
    assert f"--config.file=/etc/prometheus/{PROMETHEUS_REPLICAS_CONFIG.name}" in service["command"]
    config = load_yaml(PROMETHEUS_REPLICAS_CONFIG)
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "loraplex"]  # the rules' job
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    expected = [f"{name}:{options(s)['port']}" for name, s in replicas(document).items()]
    assert sorted(targets) == sorted(expected)
    assert [(PROMETHEUS_REPLICAS_CONFIG.parent / path).resolve() for path in config["rule_files"]] == [ALERTS]
    for name, service in replicas(document).items():  # scraped without a key
        assert options(service)["metrics_auth"] == "none", name


def test_promtool_accepts_the_replicas_config():
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_REPLICAS_CONFIG)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_header_commands_name_real_files_and_extras():
    header = "\n".join(
        line[2:] for line in COMPOSE_REPLICAS.read_text().splitlines() if line.startswith("# ")
    )
    [build] = [line for line in header.splitlines() if line.strip().startswith("docker build")]
    extras = shlex.split(build.split("#")[0])[shlex.split(build.split("#")[0]).index("--build-arg") + 1]
    assert extras.removeprefix("EXTRAS=") == compose()["services"]["loraplex-1"]["build"]["args"]["EXTRAS"]
    [up] = [line for line in header.splitlines() if "compose -f" in line]
    assert Path(REPO_ROOT / shlex.split(up)[shlex.split(up).index("-f") + 1]) == COMPOSE_REPLICAS
    assert f"-t {compose()['services']['loraplex-1']['image']}" in build
