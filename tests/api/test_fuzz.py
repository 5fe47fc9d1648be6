"""Fuzzing the JSON API from its own OpenAPI schema: no input gets a 5xx, every 4xx is OpenAI-shaped.

schemathesis turns ``/openapi.json`` into hypothesis strategies, valid (positive) and invalid
(negative) requests alike, and calls the real app in process (ASGI): ``create_app`` over a real
Engine on a tiny Llama (``max_model_len`` 64, so no generation is long) and a real adapter registry,
single-tenant (no keys). Every ``/v1/`` operation in the schema is fuzzed, so new routes are
covered as they appear. Cases are nudged towards names that exist (the base model, a stored
adapter, an adapter directory inside the allowed root) so the success paths run too, not only 404s.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from adapters.registry import AdapterRegistry
from adapters.store import SQLiteAdapterStore
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from tests.engine.test_engine_parity import save_peft_adapter

BASE = "tiny"
STORED = "stored"  # an uploaded adapter the cases may name
LOCAL = "local"  # an adapter directory inside the allowed root
VOCAB_SIZE = 260  # tests/engine/tiny.py
MAX_EXAMPLES = 30
MAX_SECONDS_PER_OPERATION = 30
MAX_STREAM_EVENTS = 256
CALL_TIMEOUT_S = 5  # any request slower than this on a tiny model at max_model_len 64 is hung
ERROR_KEYS = {"message", "type", "param", "code"}
OPERATIONS = [  # every /v1/ operation of the schema (test_every_api_operation_is_fuzzed checks)
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/adapters"),
    ("POST", "/v1/adapters/compose"),
    ("GET", "/v1/adapters"),
    ("GET", "/v1/adapters/{name}"),
    ("DELETE", "/v1/adapters/{name}"),
    ("POST", "/v1/adapters/{name}/pin"),
    ("POST", "/v1/adapters/{name}/unpin"),
    ("POST", "/v1/adapters/{name}/merge"),
    ("POST", "/v1/adapters/{name}/unmerge"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/v1/stats"),
]


class Fuzzer:
    """The app under test and the names that exist in it."""

    def __init__(self, app, registry: AdapterRegistry, adapter_dir: Path, roots: Path) -> None:
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # schemathesis cuts an in-process event stream at 20 events by default (and returns what it
        # has, without [DONE]); a stream here has at most max_model_len (64) tokens plus a few events.
        self.schema.config.max_stream_events = MAX_STREAM_EVENTS
        self.client = TestClient(app, raise_server_exceptions=False)  # a 500 is a response to check
        self.registry, self.adapter_dir, self.roots = registry, adapter_dir, roots

    def restore(self) -> None:
        """Make sure the stored adapter exists again (a fuzzed DELETE may have removed it)."""
        if not [r for r in self.registry.list("default") if r.name == STORED]:
            files = {
                p.name: p.open("rb")
                for p in self.adapter_dir.iterdir()
                if p.suffix in (".json", ".safetensors")
            }
            try:
                self.registry.upload("default", STORED, files)
            finally:
                for file in files.values():
                    file.close()


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Fuzzer]:
    root = tmp_path_factory.mktemp("fuzz")
    adapter_dir = save_peft_adapter(tiny_llama_dir, root / "adapter", seed=3, r=4, target_modules=["q_proj"])
    shutil.copytree(adapter_dir, root / "roots" / LOCAL)
    config = EngineConfig(
        max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=64
    )
    engine = Engine.from_config(ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"), config)
    store = SQLiteAdapterStore(root / "data", allowed_roots=[root / "roots"])
    registry = engine.open_registry(store)
    try:
        yield Fuzzer(create_app(engine, BASE, registry), registry, adapter_dir, root / "roots")
    finally:
        engine.shutdown()


# Fields refused by design whatever their value (suffix), and the ranges in which the
# sampling fields are accepted: a nudged generation request keeps only values it can succeed with.
REFUSED_FIELDS = ("suffix",)
SANE_VALUES = {
    "logprobs": lambda v: 0 <= v <= 5,  # chat's true/false pass as booleans
    "top_logprobs": lambda v: isinstance(v, int) and 0 <= v <= 5,
    "n": lambda v: isinstance(v, int) and 1 <= v <= 3,
    "best_of": lambda v: v == 1,
    "temperature": lambda v: 0 <= v <= 2,
    "top_p": lambda v: 0 < v <= 1,
    "top_k": lambda v: isinstance(v, int) and -1 <= v <= 300,
    "priority": lambda v: isinstance(v, int) and abs(v) < 2**31,
    "presence_penalty": lambda v: abs(v) <= 2,
    "frequency_penalty": lambda v: abs(v) <= 2,
    "repetition_penalty": lambda v: 0 < v <= 2,
    "seed": lambda v: isinstance(v, int) and 0 <= v < 2**63,
    "max_tokens": lambda v: isinstance(v, int) and 0 <= v <= 16,  # 0: with echo, the prompt is scored
    "max_completion_tokens": lambda v: isinstance(v, int) and 1 <= v <= 16,
}


def _is_sane(key: str, value: object) -> bool:
    return value is None or type(value) is bool or (type(value) in (int, float) and SANE_VALUES[key](value))


def _sane_bias(bias: object) -> dict[str, float]:
    """A generated logit_bias made one the engine takes: its keys as in-vocabulary ids, biases clipped."""
    if not isinstance(bias, dict):
        return {}
    finite = {k: v for k, v in bias.items() if type(v) in (int, float) and math.isfinite(v)}
    return {str(sum(map(ord, str(k))) % VOCAB_SIZE): max(-100.0, min(100.0, v)) for k, v in finite.items()}


def _servable(body: dict) -> None:
    """Keep a generation body's random text but make its shape one the engine can run: one prompt
    of in-vocabulary ids, valid roles, a few non-empty stop strings, sampling values in range."""
    for key in [k for k in body if k in REFUSED_FIELDS or (k in SANE_VALUES and not _is_sane(k, body[k]))]:
        del body[key]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        body["prompt"] = prompt = prompt[0]  # one prompt per request
    if isinstance(prompt, list):
        body["prompt"] = [t % VOCAB_SIZE for t in prompt if type(t) is int][:32] or [65]
    elif isinstance(prompt, str):
        body["prompt"] = prompt[:32] or "x"
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:2] or [{"role": "user", "content": "x"}]
        for message in body["messages"]:
            if isinstance(message, dict) and message.get("role") not in ("system", "user", "assistant"):
                message["role"] = "user"
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = message["content"][:16]
    stop = body.get("stop")
    if isinstance(stop, list):
        body["stop"] = [s for s in stop if isinstance(s, str) and s][:4]


def nudge(case, fuzzer: Fuzzer, towards: str | None) -> None:
    """Point the case at something that exists, so success paths run too: the base model or the
    stored adapter as ``model`` (with a servable body), the stored adapter as a path ``name`` in the
    caller's own tenant, the local adapter directory as ``lora_path``."""
    if towards is None:
        return
    body = case.body
    if isinstance(body, dict) and "model" in body:
        body["model"] = BASE if towards == "base" else STORED
        for key in [
            k for k in body if k in REFUSED_FIELDS or (k in SANE_VALUES and not _is_sane(k, body[k]))
        ]:
            del body[key]
        if "logit_bias" in body:
            body["logit_bias"] = _sane_bias(body["logit_bias"])
    if isinstance(body, dict) and "lora_path" in body:
        body["lora_path"] = str(fuzzer.roots / LOCAL)
    if isinstance(body, dict) and "lora_name" in body and towards == "adapter":
        body["lora_name"] = STORED
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = STORED
        if case.query:
            case.query.pop("tenant", None)


def call(case):
    """The response to ``case``; a request that gets no answer in CALL_TIMEOUT_S fails the test."""
    try:
        return case.call(timeout=CALL_TIMEOUT_S)
    except requests.exceptions.ReadTimeout:
        pytest.fail(
            f"no answer in {CALL_TIMEOUT_S}s to {case.method} {case.formatted_path}: {case.body!r:.2000}"
        )


def check_response(case, response) -> None:
    """No 5xx; 4xx bodies are exactly OpenAI's error shape; a 200 stream carries no error event."""
    status = response.status_code
    if status >= 500:
        pytest.fail(
            f"{status} for {case.method} {case.formatted_path}: {case.body!r:.2000}\n{response.text:.2000}"
        )
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
    elif content_type.startswith("text/event-stream"):
        events = [
            line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")
        ]
        assert events and events[-1] == "[DONE]", events[-3:]
        assert not [e for e in events[:-1] if "error" in json.loads(e)], events
    elif content_type.startswith("application/json"):
        response.json()


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_gets_a_5xx_or_a_malformed_error(fuzzer: Fuzzer, method: str, path: str) -> None:
    """Up to MAX_EXAMPLES valid and invalid requests per operation: each gets a 2xx, or a 4xx with an
    OpenAI-shaped error body; never a 5xx (a crash)."""
    operation = fuzzer.schema[path][method]
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )
    started = time.monotonic()

    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its whole case
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=cases, towards=st.sampled_from([None, "base", "base", "adapter"]))
    def fuzz(case, towards: str | None) -> None:
        fuzzer.restore()
        nudge(case, fuzzer, towards)
        check_response(case, call(case))

    fuzz()
    assert time.monotonic() - started < MAX_SECONDS_PER_OPERATION


PROMPTS = (
    st.text(max_size=12)
    | st.lists(st.integers(-3, VOCAB_SIZE + 3), max_size=12)
    | st.lists(st.text(max_size=8), min_size=1, max_size=3)
    | st.lists(st.lists(st.integers(-1, VOCAB_SIZE), max_size=8), min_size=1, max_size=3)
)
ODD_NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-200, 200)
LOGPROB_FIELDS = {  # the fields of prompt scoring, top_logprobs and logit_bias, valid and not
    "echo": st.booleans() | st.none() | st.just("yes"),
    "logprobs": st.integers(-2, 25) | st.none() | st.booleans(),
    "top_logprobs": st.integers(-2, 25) | st.none(),
    "max_tokens": st.integers(-1, 4) | st.none(),
    "logit_bias": st.none()
    | st.dictionaries(st.text(max_size=4) | st.integers(-5, 300).map(str), ODD_NUMBERS, max_size=4),
    "stream": st.booleans(),
    "n": st.integers(1, 2),
}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    prompt=PROMPTS,
    fields=st.fixed_dictionaries({}, optional=LOGPROB_FIELDS),
    nan_json=st.booleans(),
)
def test_logprob_and_bias_fields_never_get_a_5xx(fuzzer: Fuzzer, path, prompt, fields, nan_json) -> None:
    """Prompt scoring, top_logprobs and logit_bias with any values (NaN and infinities sent as JSON
    tokens too), on both endpoints, batches of prompts included: a 2xx or an OpenAI-shaped 4xx."""
    body = {"model": BASE, **fields}
    if path == "/v1/completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else "x"}]
        if type(fields.get("logprobs")) is int:  # chat's logprobs is a boolean (top_logprobs the count)
            body["logprobs"] = fields["logprobs"] % 2 == 0
    try:
        content = json.dumps(body, allow_nan=nan_json)
    except ValueError:  # a non-finite number, and allow_nan False
        return
    response = fuzzer.client.post(path, content=content, headers={"Content-Type": "application/json"})
    check_response(SimpleNamespace(method="POST", formatted_path=path, body=body), response)


def test_every_api_operation_is_fuzzed(fuzzer: Fuzzer) -> None:
    """OPERATIONS lists exactly the schema's /v1/ operations: a new route must join the fuzzing."""
    in_schema = {
        (method.upper(), path)
        for path, methods in fuzzer.schema.raw_schema["paths"].items()
        if path.startswith("/v1/")
        for method in methods
    }
    assert in_schema == set(OPERATIONS)


CONFIG_KEYS = [
    "r", "lora_alpha", "target_modules", "peft_type", "use_rslora", "base_model_name_or_path",
    "modules_to_save", "lora_dropout", "bias", "layers_to_transform",
]  # fmt: skip
JSON_VALUES = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.lists(st.text(max_size=12) | st.integers(-5, 40), max_size=4)
)  # fmt: skip


@st.composite
def damaged_adapter(draw: st.DrawFn, config: bytes, weights: bytes) -> list[tuple[str, bytes]]:
    """The two files of a real adapter, each kept, damaged (a field changed, bytes flipped, cut
    short) or replaced by random bytes; sometimes a file is left out or an extra one added."""
    raw = json.loads(config)
    how = draw(st.sampled_from(["keep", "field", "random"]))
    if how == "field":
        key = draw(st.sampled_from(CONFIG_KEYS))
        raw[key] = draw(JSON_VALUES)
    config_bytes = draw(st.binary(max_size=64)) if how == "random" else json.dumps(raw).encode()
    weights_bytes = weights
    damage = draw(st.sampled_from(["keep", "flip", "truncate", "random", "header"]))
    if damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, min(len(weights), 512) - 1))
            weights_bytes = weights_bytes[:at] + bytes([weights_bytes[at] ^ 0xFF]) + weights_bytes[at + 1 :]
    elif damage == "truncate":
        weights_bytes = weights[: draw(st.integers(0, len(weights) - 1))]
    elif damage == "random":
        weights_bytes = draw(st.binary(max_size=256))
    elif damage == "header":  # a header length that lies
        weights_bytes = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + weights[8:]
    files = [("adapter_config.json", config_bytes), ("adapter_model.safetensors", weights_bytes)]
    layout = draw(st.sampled_from(["both", "both", "both", "config only", "weights only", "extra file"]))
    if layout == "config only":
        files = files[:1]
    elif layout == "weights only":
        files = files[1:]
    elif layout == "extra file":
        files.append((draw(st.sampled_from(["README.md", "adapter_model.bin", "x.json"])), b"extra"))
    return files


def test_damaged_adapter_uploads_are_refused_cleanly_and_accepted_ones_serve(fuzzer: Fuzzer) -> None:
    """Uploads of real adapter files, damaged in random ways, get 201 or a 4xx with the reason,
    never a 5xx; and whatever is accepted then serves a completion (accepting is a promise)."""
    config = (fuzzer.adapter_dir / "adapter_config.json").read_bytes()
    weights = (fuzzer.adapter_dir / "adapter_model.safetensors").read_bytes()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(files=damaged_adapter(config, weights))
    def fuzz(files: list[tuple[str, bytes]]) -> None:
        parts = [("files", part) for part in files]
        response = fuzzer.client.post("/v1/adapters", data={"name": "damaged"}, files=parts)
        assert response.status_code in (201, 400, 413, 422), response.text
        if response.status_code != 201:
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
            return
        request = {"model": "damaged", "prompt": "Hi", "max_tokens": 2}
        served = fuzzer.client.post("/v1/completions", json=request)
        fuzzer.registry.delete("default", "damaged")
        assert served.status_code == 200, f"an accepted adapter does not serve: {served.text}"

    fuzz()


def test_the_schema_describes_uploads_as_multipart(fuzzer: Fuzzer) -> None:
    """Clients generated from /openapi.json send adapter files as multipart parts."""
    operation = fuzzer.schema.raw_schema["paths"]["/v1/adapters"]["post"]
    assert list(operation["requestBody"]["content"]) == ["multipart/form-data"]


def test_merge_answers_on_an_idle_engine(fuzzer: Fuzzer) -> None:
    """Merging a stored adapter while nothing else runs answers (200) within a few seconds: the
    handler itself drives the build to READY (it once waited for a poll only an engine step made)."""
    fuzzer.restore()
    operation = fuzzer.schema["/v1/adapters/{name}/merge"]["POST"]
    response = operation.Case(path_parameters={"name": STORED}).call(timeout=CALL_TIMEOUT_S)
    assert response.status_code == 200, response.text
