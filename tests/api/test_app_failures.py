"""Failure paths of the app that a healthy engine cannot be made to show: a stub engine, in process."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from server.api.app import create_app
from server.engine.views import EngineLimits, TokenDelta
from server.stats import CacheCounters

MODEL = "base"


class StubEngine:
    """Answers every request with the given deltas; ``encode`` raises ``encode_error`` when set."""

    def __init__(self, deltas: list[TokenDelta], running: bool = True, encode_error: Exception | None = None):
        self.deltas, self.running, self.encode_error = deltas, running, encode_error
        self.limits = EngineLimits(max_num_seqs=4, max_model_len=64, max_loras=1, max_lora_rank=8)
        self.num_unfinished = 0
        self.tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(ord("a") + i) for i in ids))
        self.aborted: list[str] = []

    @property
    def is_running(self) -> bool:
        return self.running

    def add_step_observer(self, observer) -> None:  # the metrics observe a stub that never steps
        pass

    add_load_observer = add_step_observer

    def cache_lookups(self) -> CacheCounters:
        return CacheCounters()

    def encode(self, text: str) -> list[int]:
        if self.encode_error is not None:
            raise self.encode_error
        return [1, 2, 3]

    chat_template_renders_tools = False

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.encode("")

    async def submit(self, prompt_token_ids, sampling, adapter=None, request_id=None, *, tenant="default",
                     cache_salt=None, priority=0):  # fmt: skip
        async def stream():
            for delta in self.deltas:
                yield TokenDelta(**{**delta.__dict__, "request_id": request_id})

        return stream()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def delta(tokens: list[int], text: str, finish: str | None = None, error: str | None = None, logprob=-0.5):
    return TokenDelta("", tokens, text, [logprob] * len(tokens), finish, 3, 2, error)


FAILED = [delta([0], "a"), delta([], "", "error", "adapter 'x' failed to load: bad tensor")]


def client_for(engine: StubEngine) -> TestClient:
    return TestClient(create_app(engine, MODEL), raise_server_exceptions=False)


def events_of(text: str) -> list:
    payloads = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_a_stopped_engine_fails_the_probes_and_the_requests():
    client = client_for(StubEngine([], running=False))
    assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize(("deltas", "status"), [(FAILED, 500), ([delta([], "", "abort")], 503)])
def test_a_failed_generation_is_a_server_error_body(deltas, status):
    response = client_for(StubEngine(deltas)).post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == status and response.json()["error"]["type"] == "server_error"
    if status == 500:
        assert "failed to load" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_failed_stream_ends_with_an_error_event_then_done(path):
    body = {"model": MODEL, "stream": True}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    events = events_of(client_for(StubEngine(FAILED)).post(path, json=body).text)
    assert events[-1] == "[DONE]"
    assert "failed to load" in events[-2]["error"]["message"]
    assert all("error" not in e for e in events[:-2])


def test_unexpected_exceptions_are_a_generic_500():
    engine = StubEngine([], encode_error=RuntimeError("secret internals"))
    response = client_for(engine).post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text


def test_infinite_logprobs_stay_valid_json():
    engine = StubEngine([delta([0], "a", "length", logprob=-math.inf)])
    body = {"model": MODEL, "prompt": "x", "logprobs": 1}
    response = client_for(engine).post("/v1/completions", json=body)
    assert response.json()["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0]
