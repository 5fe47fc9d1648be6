"""The OpenAI-compatible API over real HTTP: a uvicorn process serving a tiny Llama and one adapter."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.conftest import ADAPTER, BASE_MODEL, MAX_MODEL_LEN
from tests.engine.tiny import byte_level_tokenizer

GREEDY = {"temperature": 0, "ignore_eos": True}


def complete(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": BASE_MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    """The data payloads of an SSE response: parsed JSON, or the raw string ("[DONE]")."""
    events: list[dict | str] = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", f"unexpected SSE line {line!r}"
    return events


# ---- probes and model list ----
def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200


def test_models_lists_the_base_first_then_the_adapter(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [BASE_MODEL, ADAPTER]
    assert all(m["object"] == "model" and m["owned_by"] == "loraplex" for m in body["data"])
    assert body["data"][1]["parent"] == BASE_MODEL


# ---- completions ----
def test_completion_returns_text_and_usage(client):
    body = complete(client, prompt="Hello", max_tokens=7, **GREEDY)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == BASE_MODEL
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str) and choice["text"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}  # 5 bytes


def test_token_id_prompts_are_accepted(client):
    as_text = complete(client, prompt="Hello", max_tokens=5, **GREEDY)["choices"][0]["text"]
    ids = byte_level_tokenizer().encode("Hello")
    as_ids = complete(client, prompt=ids, max_tokens=5, **GREEDY)["choices"][0]["text"]
    assert as_ids == as_text


def test_greedy_is_repeatable_and_the_adapter_changes_the_output(client):
    first = complete(client, prompt="The cat", max_tokens=12, **GREEDY)["choices"][0]["text"]
    again = complete(client, prompt="The cat", max_tokens=12, **GREEDY)["choices"][0]["text"]
    adapted = complete(client, model=ADAPTER, prompt="The cat", max_tokens=12, **GREEDY)
    assert first == again
    assert adapted["model"] == ADAPTER and adapted["choices"][0]["text"] != first


def test_stop_string_cuts_the_text(client):
    text = complete(client, prompt="abc", max_tokens=12, **GREEDY)["choices"][0]["text"]
    stop = next((c for c in text[1:] if c.isascii() and c.isprintable()), None)
    if stop is None:
        pytest.skip(f"no ASCII character to stop at in {text!r}")
    body = complete(client, prompt="abc", max_tokens=12, stop=[stop], **GREEDY)
    assert body["choices"][0] | {"logprobs": None} == {
        "index": 0, "text": text[: text.index(stop)], "logprobs": None, "finish_reason": "stop",
    }  # fmt: skip


def test_explicit_nulls_mean_the_defaults(client):
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "logprobs", "top_k"])
    body = complete(client, prompt="x", max_tokens=3, **nulls)
    assert body["choices"][0]["logprobs"] is None and body["usage"]["completion_tokens"] <= 3


def test_completion_logprobs_cover_each_token(client):
    body = complete(client, prompt="Hi", max_tokens=6, logprobs=0, **GREEDY)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 6
    assert all(v <= 0 for v in logprobs["token_logprobs"])
    # logprobs 0: no alternatives, each entry holds the chosen token alone (vLLM's shape)
    assert logprobs["top_logprobs"] == [
        {token: value} for token, value in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    ]
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0


@pytest.mark.parametrize("model", [BASE_MODEL, ADAPTER])
def test_streaming_text_equals_the_non_streaming_text(client, model):
    request = {"model": model, "prompt": "Stream me", "max_tokens": 10, **GREEDY}
    expected = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    events = sse_events(
        client, "/v1/completions", {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    assert len({c["id"] for c in events[:-1]}) == 1


def test_streaming_without_include_usage_has_no_usage(client):
    body = {"model": BASE_MODEL, "prompt": "x", "max_tokens": 3, "stream": True, **GREEDY}
    events = sse_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]" and all(e["usage"] is None for e in events[:-1])


# ---- chat ----
def test_chat_completion(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = client.post(
        "/v1/chat/completions", json={"model": ADAPTER, "messages": messages, "max_tokens": 9, **GREEDY}
    ).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    rendered = "<s>system: Be brief.\n<s>user: Hi!\n<s>assistant: "  # tests/engine/tiny.py's template
    expected_prompt_tokens = len(rendered.encode()) - 3 * (len("<s>") - 1)  # <s> is one token
    assert body["usage"] == {"prompt_tokens": expected_prompt_tokens, "completion_tokens": 9,
                             "total_tokens": expected_prompt_tokens + 9}  # fmt: skip

    stream = {"model": ADAPTER, "messages": messages, "max_tokens": 9, "stream": True, "logprobs": True}
    events = sse_events(client, "/v1/chat/completions", {**stream, **GREEDY})
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"]["content"] or "" for e in events[:-1])
    assert streamed == choice["message"]["content"]
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in events[1:-1]) == 9
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_text_parts_equal_a_string_content(client):
    def reply(content) -> str:
        request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        return client.post("/v1/chat/completions", json={**request, **GREEDY}).json()["choices"][0]

    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert reply(parts)["message"] == reply("Hello")["message"]


# ---- errors ----
LONG_PROMPT = [65] * MAX_MODEL_LEN
BAD_REQUESTS = {
    "unknown model": ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    "temperature -1": ({"prompt": "x", "temperature": -1}, 400, "temperature", None),
    "top_p 0": ({"prompt": "x", "top_p": 0}, 400, "top_p", None),
    "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    "n 17": ({"prompt": "x", "n": 17}, 400, "n", None),
    "n 0": ({"prompt": "x", "n": 0}, 400, "n", None),
    "temperature as a string": ({"prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    "missing prompt": ({}, 400, "prompt", None),
    "too many prompts": ({"prompt": ["a"] * 257}, 400, "prompt", None),
    "token id out of range": ({"prompt": [100_000]}, 400, None, None),
    "prompt too long": ({"prompt": LONG_PROMPT}, 400, None, "context_length_exceeded"),
    "max_tokens 0 without echo": ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    "negative logprobs": ({"prompt": "x", "logprobs": -1}, 400, "logprobs", None),
}


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_completion_requests_get_openai_errors(client, case):
    body, status, param, code = BAD_REQUESTS[case]
    error = assert_error(
        client.post("/v1/completions", json={"model": BASE_MODEL, **body}), status, param, code
    )
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param in error["message"]


def test_malformed_json_is_a_400(client):
    response = client.post(
        "/v1/completions",
        content=b'{"model": "tiny", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert "not valid JSON" in assert_error(response, 400, None, None)["message"]


def test_bad_chat_requests_get_openai_errors(client):
    def chat(**body) -> httpx.Response:
        return client.post("/v1/chat/completions", json={"model": BASE_MODEL, **body})

    assert_error(
        chat(model="nope", messages=[{"role": "user", "content": "x"}]), 404, "model", "model_not_found"
    )
    assert_error(chat(messages=[]), 400, "messages", None)
    assert_error(chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", None)
    too_long = [{"role": "user", "content": "A" * MAX_MODEL_LEN}]
    assert_error(chat(messages=too_long), 400, None, "context_length_exceeded")


def test_unknown_routes_and_methods_get_openai_errors(client):
    assert_error(client.get("/v1/nothing"), 404, None, None)
    assert_error(client.get("/v1/completions"), 405, None, None)


def test_still_healthy_after_bad_requests(client):
    for body, *_ in BAD_REQUESTS.values():
        assert client.post("/v1/completions", json={"model": BASE_MODEL, **body}).status_code >= 400
    assert client.get("/health").status_code == 200
    assert complete(client, prompt="ok", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_n_choices_are_independent_samples_with_summed_usage(client):
    body = complete(client, prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in body["choices"]]
    assert len(set(texts)) > 1, "seeded choices draw from seed + index, so they differ"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 18, "total_tokens": 23}
    again = complete(client, prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True)
    assert [c["text"] for c in again["choices"]] == texts
    single = complete(client, prompt="Hello", max_tokens=6, temperature=1.0, seed=8, ignore_eos=True)
    assert single["choices"][0]["text"] == texts[1], "choice 1 is what seed 8 gives alone"


def test_streamed_n_choices_carry_their_index_and_equal_the_whole_response(client):
    body = {"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 5, "n": 2, "seed": 3, "temperature": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert events[-2]["usage"]["completion_tokens"] == 10
    whole = complete(
        client, **{k: v for k, v in body.items() if k not in ("stream", "stream_options", "model")}
    )
    assert [texts[0], texts[1]] == [c["text"] for c in whole["choices"]]


def test_chat_n_choices(client):
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
            "seed": 1, "temperature": 1.0}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in response["choices"])


# ---- client disconnects abort the generation ----
LONG_REQUEST = {"model": BASE_MODEL, "prompt": "x", "max_tokens": 1500, **GREEDY}  # seconds of work


def assert_engine_free(client: httpx.Client) -> None:
    """The server runs one sequence at a time, so a quick answer means the long request is gone."""
    start = time.monotonic()
    complete(client, prompt="next", max_tokens=2)
    assert time.monotonic() - start < 1.5, "the abandoned request kept the engine busy"


def test_closing_a_stream_aborts_its_generation(client):
    with client.stream("POST", "/v1/completions", json={**LONG_REQUEST, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert_engine_free(client)


def test_a_client_that_gives_up_aborts_a_non_streaming_generation(server, client):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG_REQUEST, timeout=httpx.Timeout(5, read=0.3))
    assert_engine_free(client)
