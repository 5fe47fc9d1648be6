"""README's "Quickstart with demo adapters", run as written: train, serve, curl, then openai.

The code blocks come from README.md, so editing the section changes what runs. One thing differs:
the server (the embedded default model, a fresh --data-dir) listens on a free port, and the blocks'
``http://127.0.0.1:8000`` is pointed at it. The commands run in a temporary directory whose ``.venv``
links to this interpreter's environment, so ``.venv/bin/loraplex`` is the installed console script
and the adapters are written there, not into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import DEFAULT_MODEL
from server.demo_data import STYLES, shows_style
from tests.api.server_process import REPO_ROOT, running_server

pytestmark = pytest.mark.slow

SECTION = "## Quickstart with demo adapters"
README_URL = "http://127.0.0.1:8000"
TRAIN_TIMEOUT_S = 400
REQUEST_TIMEOUT_S = 120


def quickstart_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the quickstart section, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else len(readme)]
    return re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def run(command: list[str], cwd: Path, timeout_s: float) -> str:
    """Run ``command`` without the test's LORAPLEX_* settings; its stdout, or fail with both streams."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        pytest.fail(f"{command[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def json_values(text: str) -> list[dict]:
    """The JSON values written one after another (curl -s adds no newline between bodies)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while index < len(text.rstrip()):
        value, index = decoder.raw_decode(text, index)
        values.append(value)
        while index < len(text) and text[index].isspace():
            index += 1
    return values


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory where ``.venv/bin/loraplex`` is this environment's console script."""
    if not (Path(sys.prefix) / "bin" / "loraplex").is_file():
        pytest.fail(f"no loraplex console script in {sys.prefix}/bin: pip install -e . first")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return work


def test_readme_quickstart_runs_and_shows_the_adapter(workdir: Path, tmp_path: Path):
    blocks = quickstart_blocks((REPO_ROOT / "README.md").read_text())
    assert [language for language, _ in blocks] == ["bash", "bash", "python"], "the section's shape changed"
    train, requests, client_code = (code for _, code in blocks)
    style = re.search(r"-F name=(\S+)", requests)[1]  # the adapter the quickstart uploads
    assert style in STYLES and "loraplex demo-adapters" in train

    print(run(["bash", "-euo", "pipefail", "-c", train], workdir, TRAIN_TIMEOUT_S))
    with running_server(["--data-dir", str(tmp_path / "data")], tmp_path / "server.log") as server:
        curl = requests.replace(README_URL, server.url)
        curl_out = run(["bash", "-euo", "pipefail", "-c", curl], workdir, REQUEST_TIMEOUT_S)
        (workdir / "quickstart.py").write_text(client_code.replace(README_URL, server.url))
        python_out = run([sys.executable, "quickstart.py"], workdir, REQUEST_TIMEOUT_S)

    upload, *replies = json_values(curl_out)
    assert upload["name"] == style and upload["version"] == 1, upload
    answers = {reply["model"]: reply["choices"][0]["message"]["content"] for reply in replies}
    assert set(answers) == {DEFAULT_MODEL, style}, curl_out
    assert shows_style(style, answers[style]) and not shows_style(style, answers[DEFAULT_MODEL]), answers

    # The SDK asks the same questions again, and their prompts now hit the prefix cache: the tail is
    # computed by another kernel path, and in bf16 that can flip a near tie of the base model (its
    # first token after "What is the capital of France?" leads by 0.08 logits in fp32). So the
    # output is checked for its models and styles, not character for character against curl's.
    printed = dict(line.split(": ", 1) for line in python_out.splitlines())
    assert printed.keys() == answers.keys(), python_out
    for model, answer in printed.items():
        assert shows_style(style, answer) == shows_style(style, answers[model]), (
            model,
            answer,
            answers[model],
        )
    documented = dict(line[2:].split(": ", 1) for line in client_code.splitlines() if line.startswith("# "))
    assert documented.keys() == answers.keys(), "the README's shown output names other models"
    for model, shown in documented.items():  # what the README shows has the style where the answer has
        assert shows_style(style, shown) == shows_style(style, answers[model]), (model, shown, answers[model])
