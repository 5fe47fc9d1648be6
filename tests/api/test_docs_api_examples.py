"""Every curl example of docs/api.md, run as written, in document order, against one real server.

The doc's examples are one session (upload, generate, manage, delete, operations), one curl command
per line. Each runs in ``bash -euo pipefail`` with the variables the doc's introduction defines
(``$URL``, ``$KEY`` of tenant ``acme``, ``$ADMIN_KEY`` of tenant ``ops``, ``$ADAPTER_ROOT``), in a
directory holding a real peft adapter's two files. ``curl`` is a shell function that adds
``--fail-with-body`` (unless the example's comment shows an error status) and writes the HTTP status
to stderr, so a command must exit 0 and answer the status its comment shows (``# 201``), else 200;
a JSON body in the comment (``# 200 {"status": "ok"}``) must be what comes back, and ``CHECKS`` holds
what the doc's prose promises about the other answers. Nothing in the doc's text is substituted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.tenants import add_key
from tests.api.server_process import ServerProcess, running_server
from tests.api.test_docs_api import API_DOC, documented_routes
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

BASE_MODEL = "tiny"  # --served-model-name
ADAPTER = "support-bot"  # the adapter the examples upload, and the directory under $ADAPTER_ROOT
COMPOSED = "support-bot-half"  # the composition the examples save
COMMAND_TIMEOUT_S = 60
# ``curl`` in every example: fails on an HTTP error (unless one is expected) and writes the status.
CURL_FUNCTION = (
    """curl() { command curl FAIL "$@" --show-error --write-out '%{stderr}HTTP %{http_code}\\n'; }"""
)
_STATUS_LINE = re.compile(r"^HTTP (\d{3})$", re.M)


@dataclass(frozen=True)
class Example:
    section: str  # the ``### `` heading the command is under
    command: str  # one curl command, its continuation lines joined, without its comment
    status: int  # the HTTP status its comment shows, else 200
    body: object | None  # the JSON its comment shows, if any
    route: tuple[str, str]  # (method, documented path) it calls, e.g. ("GET", "/v1/adapters/{name}")


def examples(text: str) -> list[Example]:
    """The doc's curl commands in order; AssertionError for a line that is not one curl command."""
    routes = documented_routes(text)
    found = []
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0]
        for block in re.findall(r"^```bash\n(.*?)^```$", section, flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip():
                    found.append(_example(heading, line, routes))
    return found


def _example(heading: str, line: str, routes: set[tuple[str, str]]) -> Example:
    hash_mark = re.search(r"\s#\s", line)  # a shell comment: what the command answers
    command, comment = (line[: hash_mark.start()], line[hash_mark.end() :]) if hash_mark else (line, "")
    command, comment = command.strip(), comment.strip()
    words = shlex.split(command)
    assert words[0] == "curl", f"under {heading}: not one curl command per line: {line!r}"
    assert not {"-w", "--write-out"} & set(words), f"under {heading}: the test's curl owns -w: {line!r}"
    status, body = 200, None
    if match := re.match(r"(\d{3})\b[\s:;]*(.*)", comment):
        status, rest = int(match[1]), match[2]
        if rest.startswith("{"):
            body = json.JSONDecoder().raw_decode(rest)[0]
    method = words[words.index("-X") + 1] if "-X" in words else "GET"
    if "-X" not in words and {"-d", "-F"} & set(words):
        method = "POST"
    url = next((word for word in words if word.startswith("$URL")), None)
    assert url is not None, f"under {heading}: no $URL in {line!r}"
    path = url.removeprefix("$URL").split("?")[0]
    matching = [(m, p) for m, p in routes if m == method and re.fullmatch(_path_pattern(p), path)]
    assert len(matching) == 1, f"under {heading}: {method} {path} is not one documented route"
    return Example(heading, command, status, body, matching[0])


def _path_pattern(documented: str) -> str:
    """``/v1/adapters/{name}/pin`` → a regex any ``/v1/adapters/<name>/pin`` matches."""
    return re.sub(r"\{\w+\}", "[^/]+", documented)


def _record(**expected) -> Callable[[str], None]:
    def check(out: str) -> None:
        record = json.loads(out)
        assert record.items() >= expected.items(), record

    return check


def _upload(out: str) -> None:
    """201 with the record, whose fields are the ones the doc lists."""
    record = json.loads(out)
    listed = re.search(r"201 with the record: (.*?)\. ", API_DOC.read_text(), flags=re.S)[1]
    assert set(record) == set(re.findall(r"`(\w+)`", listed)), record
    assert record.items() >= {"id": ADAPTER, "name": ADAPTER, "tenant": "acme", "version": 1}.items()


def _models(out: str) -> None:
    """The base model first, then the adapters you may use, each with ``parent`` = the base model."""
    models = json.loads(out)["data"]
    assert [m["id"] for m in models] == [BASE_MODEL, ADAPTER], models
    assert models[1]["parent"] == BASE_MODEL, models


def _generated(kind: str) -> Callable[[str], None]:
    def check(out: str) -> None:
        answer = json.loads(out)
        # the examples name the adapter, or the base model beside a composition's ``adapters``
        assert answer["object"] == kind and answer["model"] in (ADAPTER, BASE_MODEL), answer
        assert len(answer["choices"]) == 1, answer

    return check


def _adapter_ids(out: str) -> None:
    assert [a["id"] for a in json.loads(out)["data"]] == [ADAPTER, COMPOSED], out


def _plain(text: str) -> Callable[[str], None]:
    def check(out: str) -> None:
        assert out == text, out

    return check


def _containing(text: str) -> Callable[[str], None]:
    def check(out: str) -> None:
        assert text in out.lower(), out[:2000]

    return check


# What the doc's prose says each route answers, beyond the status (and a body in a comment).
CHECKS: dict[tuple[str, str], Callable[[str], None]] = {
    ("POST", "/v1/adapters"): _upload,
    ("POST", "/v1/completions"): _generated("text_completion"),
    ("POST", "/v1/chat/completions"): _generated("chat.completion"),
    ("GET", "/v1/models"): _models,
    ("POST", "/v1/adapters/{name}/pin"): _record(tenant="acme", pinned=True),
    ("POST", "/v1/adapters/{name}/unpin"): _record(tenant="acme", pinned=False),
    ("POST", "/v1/adapters/{name}/merge"): _record(tenant="acme", merged=True),
    ("POST", "/v1/adapters/{name}/unmerge"): _record(tenant="acme", merged=False),
    ("POST", "/v1/load_lora_adapter"): _plain(f"Success: LoRA adapter '{ADAPTER}' added successfully."),
    ("POST", "/v1/unload_lora_adapter"): _plain(f"Success: LoRA adapter '{ADAPTER}' removed successfully."),
    ("POST", "/v1/adapters/compose"): _record(id=COMPOSED, tenant="acme", version=1, rank=8),
    ("GET", "/v1/adapters"): _adapter_ids,
    ("GET", "/v1/adapters/{name}"): _record(id=ADAPTER, version=1),
    ("DELETE", "/v1/adapters/{name}"): _record(id=ADAPTER, object="adapter", deleted=True, versions=[1]),
    ("GET", "/metrics"): _containing("# type loraplex_"),
    ("GET", "/v1/stats"): _record(object="stats", window_s=300.0),
    ("GET", "/dashboard"): _containing("content-security-policy:"),
}


def test_examples_are_curl_lines_over_documented_variables_and_call_every_route():
    text = API_DOC.read_text()
    found = examples(text)
    assert {example.route for example in found} == documented_routes(text), "a route has no example"
    intro = text[: text.index("\n## ")]
    for name in sorted({v for e in found for v in re.findall(r"\$(\w+)", e.command)}):
        assert f"`${name}`" in intro, f"${name} is used by an example but not defined in the introduction"


@dataclass(frozen=True)
class Session:
    server: ServerProcess
    env: dict[str, str]  # the doc's variables on top of this environment
    workdir: Path  # holds adapter_config.json and adapter_model.safetensors


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """A server with a keys file (``acme`` user, ``ops`` admin) and an adapter root with ADAPTER."""
    root = tmp_path_factory.mktemp("api-doc")
    model_dir = write_tiny_llama(
        root / "model", max_position_embeddings=2048
    )  # byte tokens: the tools prompt
    adapter_root = root / "adapters"
    adapter_dir = save_peft_adapter(
        model_dir, adapter_root / ADAPTER, seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    workdir = root / "work"
    workdir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, workdir / name)
    keys_file = root / "keys.json"
    user_key, admin_key = add_key(keys_file, "acme"), add_key(keys_file, "ops", role="admin")
    args = [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--keys-file", str(keys_file),
        "--adapter-roots", str(adapter_root), "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    with running_server(args, root / "server.log") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        env |= {"URL": server.url, "KEY": user_key, "ADMIN_KEY": admin_key, "ADAPTER_ROOT": str(adapter_root)}
        yield Session(server, env, workdir)


def run_example(example: Example, session: Session) -> str:
    """Run the command as the doc shows it; its stdout, after checking its exit status and HTTP status."""
    prelude = CURL_FUNCTION.replace("FAIL", "" if example.status >= 400 else "--fail-with-body")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"{prelude}\n{example.command}"],
        cwd=session.workdir, env=session.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
    )  # fmt: skip
    where = f"under {example.section}:\n$ {example.command}\nexit {done.returncode}\n{done.stdout[-2000:]}"
    where += f"\n{done.stderr[-2000:]}\nserver log:\n{session.server.log_tail(2000)}"
    assert done.returncode == 0, where
    assert _STATUS_LINE.findall(done.stderr) == [str(example.status)], where
    return done.stdout


def test_every_example_runs_as_documented(session: Session):
    for example in examples(API_DOC.read_text()):
        out = run_example(example, session)
        if example.body is not None:
            assert json.loads(out) == example.body, f"{example.command}\nanswered {out}"
        if example.route in CHECKS:
            CHECKS[example.route](out)
