"""The layering of docs/architecture.md, checked on the source (every import, module level or not).

- imports point one way: server/api → server/engine → server/model → server/ops; everything may
  use adapters/, which imports nothing from server/; the client package imports neither;
- the HTTP layer, the metrics and the CLI see the engine only through its facade: they import
  nothing from the engine's internals and never read an ``engine.core``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package → the packages of this repo it may import besides itself (server.config, the frozen
# settings, and server.stats, the dashboard's counters, import nothing of ours: leaves all may read)
LEAVES = {"server.config", "server.stats", "adapters"}
ALLOWED = {
    "adapters": set(),
    "server.ops": LEAVES,
    "server.model": {"server.ops", *LEAVES},
    "server.engine": {"server.model", "server.ops", *LEAVES},
    "server.api": {
        "server.engine",
        "server.model",
        "server.metrics",
        "server.stats",
        "server.settings",
        *LEAVES,
    },
}
FACADE_USERS = ("server/api", "server/metrics.py", "server/cli.py", "server/stats.py")
ENGINE_INTERNALS = {"core", "scheduler", "runner", "kv_cache", "sequence", "detokenizer", "request_stream"}


def _modules(where: str) -> list[Path]:
    path = ROOT / where
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in ("server", "adapters"):  # from server import metrics
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] in ("server", "adapters", "loraplex_client")}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "server" else parts[0]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    bad = []
    for path in _modules(package.replace(".", "/")):
        for module in _imports(path):
            target = _package(module)
            if target != package and target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_client_package_imports_no_server_code():
    paths = _modules("clients/python/loraplex_client")
    bad = [
        f"{p.relative_to(ROOT)}: {m}"
        for p in paths
        for m in _imports(p)
        if not m.startswith("loraplex_client")
    ]
    assert paths and not bad, bad


@pytest.mark.parametrize("where", FACADE_USERS)
def test_the_engine_is_used_through_its_facade(where):
    bad = []
    for path in _modules(where):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "core":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .core")
        for module in _imports(path):
            if module.startswith("server.engine.") and module.split(".")[2] in ENGINE_INTERNALS:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)
