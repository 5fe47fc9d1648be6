"""``loraplex-client`` as a subprocess against the real server, configured through the environment;
and the package's promise of not importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loraplex_client import Client

from tests.clients.conftest import BASE_MODEL, GREEDY, MESSAGES, Deployment

CLI = [sys.executable, "-m", "loraplex_client.cli"]
GREEDY_FLAGS = ["--temperature", "0", "--max-tokens", str(GREEDY["max_tokens"]), "--ignore-eos"]


def run_cli(deployment: Deployment | None, *args: str, key: str | None = None, cwd: Path) -> tuple:
    """(exit code, stdout, stderr) of one CLI run; LORAPLEX_* come from ``deployment`` only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    if deployment is not None:
        env.update(LORAPLEX_BASE_URL=deployment.url, LORAPLEX_API_KEY=key or deployment.keys["user"])
    env["PYTHONIOENCODING"] = "utf-8"
    done = subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, timeout=120)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def test_package_imports_no_torch(tmp_path: Path) -> None:
    code = "import loraplex_client, loraplex_client.cli, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)


def test_cli_adapter_administration(deployment: Deployment, tmp_path: Path) -> None:
    rc, out, err = run_cli(deployment, "upload", "cli-parrot", str(deployment.other_adapter_dir), "--json",
                           cwd=tmp_path)  # fmt: skip
    assert rc == 0, err
    uploaded = json.loads(out)
    assert (uploaded["id"], uploaded["version"], uploaded["rank"]) == ("cli-parrot", 1, 8)

    rc, out, err = run_cli(deployment, "list", "--json", cwd=tmp_path)
    assert rc == 0 and "cli-parrot" in [a["id"] for a in json.loads(out)], err
    rc, out, _ = run_cli(deployment, "list", cwd=tmp_path)
    header = ["id", "version", "rank", "size_bytes", "tier", "pinned"]
    assert rc == 0 and out.splitlines()[0].split() == header
    rc, out, _ = run_cli(deployment, "get", "cli-parrot", cwd=tmp_path)
    assert rc == 0 and "name: cli-parrot" in out.splitlines()
    rc, out, _ = run_cli(deployment, "models", cwd=tmp_path)
    assert rc == 0 and out.split()[0] == BASE_MODEL and "cli-parrot" in out.split()

    rc, out, _ = run_cli(deployment, "delete", "cli-parrot", cwd=tmp_path)
    assert rc == 0 and out.strip() == "deleted cli-parrot (versions 1)"
    rc, out, err = run_cli(deployment, "get", "cli-parrot", cwd=tmp_path)
    assert (rc, out) == (1, "") and "does not exist" in err and "model_not_found" in err


def test_cli_generation_prints_what_the_client_gets(
    deployment: Deployment, client: Client, adapter: str, tmp_path: Path
) -> None:
    expected = client.completions(adapter, "Hello", **GREEDY).text
    for stream in ([], ["--stream"]):
        rc, out, err = run_cli(deployment, "complete", "--model", adapter, *GREEDY_FLAGS, *stream, "Hello",
                               cwd=tmp_path)  # fmt: skip
        assert (rc, out) == (0, expected + "\n"), err
    expected_chat = client.chat(BASE_MODEL, MESSAGES, **GREEDY).content
    for stream in ([], ["--stream"]):
        message = MESSAGES[0]["content"]
        rc, out, err = run_cli(deployment, "chat", "--model", BASE_MODEL, *GREEDY_FLAGS, *stream, message,
                               cwd=tmp_path)  # fmt: skip
        assert (rc, out) == (0, expected_chat + "\n"), err


def test_cli_flags_override_the_environment(deployment: Deployment, tmp_path: Path) -> None:
    rc, out, err = run_cli(None, "models", "--json", "--base-url", deployment.url,
                           "--api-key", deployment.keys["user"], cwd=tmp_path)  # fmt: skip
    assert rc == 0 and json.loads(out)[0]["id"] == BASE_MODEL, err


@pytest.mark.parametrize(
    ("args", "key", "code", "needle"),
    [
        ((), None, 2, "required"),
        (("complete", "Hello"), None, 2, "--model"),
        (("upload", "x", "/no/such/dir"), None, 2, "not a directory"),
        (("models",), "lpx-wrong", 1, "invalid_api_key"),
        (("complete", "--model", "no-such-model", "Hello"), None, 1, "model_not_found"),
    ],
)
def test_cli_exit_codes(deployment: Deployment, tmp_path: Path, args, key, code, needle) -> None:
    rc, out, err = run_cli(deployment, *args, key=key, cwd=tmp_path)
    assert rc == code and needle in err and out == ""
