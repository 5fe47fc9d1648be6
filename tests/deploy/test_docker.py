"""The Dockerfile and .dockerignore, without a Docker engine: hadolint, the image's structure, its
HEALTHCHECK command run against a real server, and (slow) its install script run in a clean venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.server_process import free_port
from tests.deploy.files import (
    DOCKERFILE,
    DOCKERIGNORE,
    INSTALL_SCRIPT,
    REPO_ROOT,
    Stage,
    copy_sources,
    dockerfile_stages,
    exec_form,
    serve_options,
    tool,
)

INSTALL_TIMEOUT_S = 1800  # torch, transformers and the rest into an empty venv, then a ~30 s conversion


def runtime() -> Stage:
    _, stages = dockerfile_stages()
    return stages[-1]


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the build context.

    Docker's rules: a pattern matches the path from the context root (``*`` within one name,
    ``**`` across folders), a leading ``!`` re-includes, the last matching pattern wins.
    """
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if any(_pattern_regex(pattern).fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def _pattern_regex(pattern: str) -> re.Pattern:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(regex)


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_multi_stage_build_on_a_configurable_base():
    prelude, stages = dockerfile_stages()
    assert len(stages) >= 2
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in prelude
    assert all(stage.base == "${BASE_IMAGE}" for stage in stages)  # the CUDA build swaps one argument
    build = stages[0]
    assert any(f"sh {INSTALL_SCRIPT.relative_to(REPO_ROOT)}" in run for run in build.all("RUN"))
    assert build.env()["LORAPLEX_CACHE_DIR"] == runtime().env()["LORAPLEX_CACHE_DIR"]  # baked, then used
    [copied] = runtime().all("COPY")
    assert copied.startswith(f"--from={build.name} ")
    assert "/opt/loraplex" in copied and build.env()["LORAPLEX_CACHE_DIR"].startswith("/opt/loraplex/")


def test_the_runtime_runs_as_a_non_root_user_offline():
    [user] = runtime().all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    assert runtime().env()["HF_HUB_OFFLINE"] == "1"


def test_it_serves_loraplex_on_all_interfaces_on_port_8000():
    assert runtime().all("EXPOSE") == ["8000"]
    [entrypoint] = runtime().all("ENTRYPOINT")
    assert exec_form(entrypoint) == ["loraplex", "serve", "--host", "0.0.0.0"]
    options = serve_options(exec_form(entrypoint)[2:], runtime().env())
    assert (options["host"], options["port"], str(options["data_dir"])) == ("0.0.0.0", 8000, "/data")


def test_every_copied_path_exists_and_is_in_the_build_context():
    _, stages = dockerfile_stages()
    sources = [source for stage in stages for source, _ in copy_sources(stage)]
    assert "pyproject.toml" in sources and "server" in sources and "adapters" in sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert not is_ignored(source), f".dockerignore leaves out {source}, which the Dockerfile copies"


def test_the_build_context_leaves_out_the_venv_git_and_secrets():
    for path in (
        ".venv/bin/python",
        ".git/config",
        "deploy/secrets/keys.json",
        "keys.json",
        "tests/conftest.py",
    ):
        assert is_ignored(path), path
    for path in ("server/cli.py", "server/data/x.py", "deploy/docker/install.sh", "README.md"):
        assert not is_ignored(path), path


def test_the_healthcheck_command_passes_on_a_live_server_and_fails_without_one(served):
    [healthcheck] = runtime().all("HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/health" in command[-1]
    command[0] = sys.executable  # the image's venv python is first on its PATH
    environ = {**os.environ, "LORAPLEX_PORT": str(served.port)}
    assert subprocess.run(command, env=environ, capture_output=True, timeout=30).returncode == 0
    environ["LORAPLEX_PORT"] = str(free_port())
    assert subprocess.run(command, env=environ, capture_output=True, timeout=30).returncode != 0


@pytest.mark.slow
def test_the_install_script_gives_a_working_server_in_a_clean_venv(tmp_path):
    """The build stage's steps on this machine: the files it COPYs, then deploy/docker/install.sh into
    a fresh ``python -m venv`` (torch from pip's configured index instead of the PyTorch CPU index)."""
    _, stages = dockerfile_stages()
    context = tmp_path / "src"
    for source, destination in copy_sources(stages[0]):
        target = context / destination.removeprefix("./")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO_ROOT / source).is_dir():
            shutil.copytree(REPO_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    cache_dir = tmp_path / "cache"
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    environ = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LORAPLEX_")}
    environ.update(PYTHON=str(python), TORCH_INDEX_URL="", LORAPLEX_CACHE_DIR=str(cache_dir))
    script = context / INSTALL_SCRIPT.relative_to(REPO_ROOT)
    result = subprocess.run(
        ["sh", str(script)],
        cwd=context,
        env=environ,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    [converted] = [path for path in (cache_dir / "models").iterdir() if path.is_dir()]  # and a lock file
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()

    def run(code: str) -> str:
        done = subprocess.run(
            [str(python), "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout.strip()

    assert Path(run("import server.cli; print(server.cli.__file__)")).is_relative_to(venv)
    reused = run(
        "from server.config import ModelConfig; from server.model.loader import resolve_checkpoint; "
        "print(resolve_checkpoint(ModelConfig()).path)"
    )
    assert Path(reused) == converted  # the baked conversion is found, not made again
    assert (venv / "bin" / "loraplex").is_file()
    assert run("import torch; print(torch.__version__)").startswith("2.13.0")
