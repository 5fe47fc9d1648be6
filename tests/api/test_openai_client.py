"""The official ``openai`` package, unchanged, against a real ``loraplex serve`` process.

One server per module: a tiny random Llama (byte-level tokenizer, so a prompt of n ASCII
characters is n tokens) and two peft adapters, on the CPU. ``ignore_eos`` (a loraplex extension,
sent with ``extra_body``) makes every greedy request generate exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.api.server_process import ServerProcess, running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

BASE = "tiny-base"  # --served-model-name
ADAPTERS = ("lora-qv", "lora-all")
PROMPT = "The cat"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("openai-client")
    model_dir = write_tiny_llama(root / "model")
    adapter_dirs = [
        save_peft_adapter(model_dir, root / ADAPTERS[0], seed=21, r=8, lora_alpha=16,
                          target_modules=["q_proj", "v_proj"]),
        save_peft_adapter(model_dir, root / ADAPTERS[1], seed=22, r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]),
    ]  # fmt: skip
    args = [
        "--model", str(model_dir), "--served-model-name", BASE, "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--max-num-seqs", "4", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    for name, path in zip(ADAPTERS, adapter_dirs, strict=True):
        args += ["--adapter", f"{name}={path}"]
    with running_server(args, root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    # the server runs without a keys file and ignores the key; the client insists on one
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        yield oai


def complete(client: openai.OpenAI, model: str, **kwargs):
    return client.completions.create(model=model, prompt=PROMPT, **{"max_tokens": MAX_TOKENS, **kwargs})


def chat(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(
        model=model, messages=MESSAGES, **{"max_tokens": MAX_TOKENS, **kwargs}
    )


def assert_usage(usage, prompt_tokens: int, completion_tokens: int) -> None:
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert usage.total_tokens == prompt_tokens + completion_tokens


# ---- the model list ----
def test_models_list_the_base_first_then_the_adapters_with_the_base_as_parent(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, *sorted(ADAPTERS)]  # adapters sorted by name
    assert all(m.object == "model" and m.owned_by == "loraplex" for m in models)
    assert [m.parent for m in models[1:]] == [BASE, BASE]  # an extra field, kept by the client's models


# ---- completions ----
def test_completion_text_usage_and_finish_reason(client):
    response = complete(client, BASE, **GREEDY)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == BASE
    [choice] = response.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert_usage(response.usage, len(PROMPT), MAX_TOKENS)


def test_openai_fields_that_do_not_change_the_output_are_accepted_and_an_unknown_one_is_refused(client):
    plain = chat(client, BASE, **GREEDY).choices[0].message.content
    tagged = chat(client, BASE, user="u-1", metadata={"team": "x"}, store=False, service_tier="auto",
                  safety_identifier="s", prompt_cache_key="k", **GREEDY)  # fmt: skip
    assert tagged.choices[0].message.content == plain
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, BASE, extra_body={"min_p": 0.2})
    assert refused.value.body["param"] == "min_p"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_adapter_changes_the_greedy_completion(client, adapter):
    base = complete(client, BASE, **GREEDY)
    adapted = complete(client, adapter, **GREEDY)
    assert adapted.model == adapter
    assert adapted.choices[0].text != base.choices[0].text
    assert_usage(adapted.usage, len(PROMPT), MAX_TOKENS)


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_streamed_completion_equals_the_non_streamed_one(client, model):
    expected = complete(client, model, **GREEDY)
    stream = complete(client, model, stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.usage is None for c in text_chunks) and usage_chunk.choices == []
    assert_usage(usage_chunk.usage, len(PROMPT), MAX_TOKENS)
    assert len({c.id for c in chunks}) == 1 and all(c.model == model for c in chunks)


def test_max_tokens_bounds_the_completion(client):
    for max_tokens in (1, 3):
        response = complete(client, ADAPTERS[0], max_tokens=max_tokens, **GREEDY)
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == max_tokens


def test_stop_string_cuts_the_completion(client):
    text = complete(client, BASE, max_tokens=12, **GREEDY).choices[0].text
    stop = next((c for c in text[1:] if c.isascii() and c.isprintable()), None)
    if stop is None:
        pytest.skip(f"no ASCII character to stop at in {text!r}")
    response = complete(client, BASE, max_tokens=12, stop=[stop], **GREEDY)
    assert response.choices[0].text == text[: text.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = complete(client, BASE, max_tokens=12, stop=stop, stream=True, **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_at_temperature_1_reproducible(client):
    def sample(seed: int, **kwargs) -> str:
        response = complete(client, ADAPTERS[1], max_tokens=16, temperature=1, seed=seed, **kwargs)
        return "".join(c.choices[0].text for c in response) if kwargs else response.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1234, stream=True) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_completion_logprobs_cover_each_generated_token(client):
    response = complete(client, ADAPTERS[0], logprobs=1, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == MAX_TOKENS
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = complete(client, ADAPTERS[0], logprobs=1, stream=True, **GREEDY)
    values = [v for c in streamed for v in c.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(logprobs.token_logprobs, abs=1e-4)


# ---- chat ----
@pytest.mark.parametrize("model", [BASE, ADAPTERS[0]])
def test_chat_completion_and_its_stream_agree(client, model):
    response = chat(client, model, **GREEDY)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert response.usage.completion_tokens == MAX_TOKENS and response.usage.prompt_tokens > 0
    stream = chat(client, model, stream=True, stream_options={"include_usage": True}, **GREEDY)
    *chunks, usage_chunk = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length" and usage_chunk.choices == []
    assert_usage(usage_chunk.usage, response.usage.prompt_tokens, MAX_TOKENS)


def test_an_adapter_changes_the_greedy_chat_reply(client):
    base = chat(client, BASE, **GREEDY)
    adapted = chat(client, ADAPTERS[1], **GREEDY)
    assert adapted.model == ADAPTERS[1]
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert adapted.usage.prompt_tokens == base.usage.prompt_tokens  # same template, same messages


def test_chat_stop_and_seed(client):
    text = chat(client, BASE, max_tokens=12, **GREEDY).choices[0].message.content
    stop = next((c for c in text[1:] if c.isascii() and c.isprintable()), None)
    if stop is not None:
        cut = chat(client, BASE, max_tokens=12, stop=[stop], **GREEDY).choices[0]
        assert (cut.message.content, cut.finish_reason) == (text[: text.index(stop)], "stop")
    sampled = [chat(client, ADAPTERS[0], temperature=1, seed=99).choices[0].message.content for _ in "ab"]
    assert sampled[0] == sampled[1]


def test_chat_logprobs(client):
    response = chat(client, ADAPTERS[0], logprobs=True, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS and all(t.logprob <= 0 for t in content)


# ---- errors ----
@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_is_a_not_found_error(client, stream):
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "gpt-4", stream=stream)
    assert caught.value.status_code == 404
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "no-such-adapter", stream=stream)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("temperature", [-1, -0.5])
def test_a_bad_temperature_is_a_bad_request_error(client, temperature):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, BASE, temperature=temperature)
    assert caught.value.status_code == 400 and caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, ADAPTERS[0], temperature=temperature, stream=True)
    assert caught.value.param == "temperature"


def test_the_server_still_answers_after_the_errors(client, server: ServerProcess):
    assert server.process.poll() is None
    assert complete(client, BASE, max_tokens=2).usage.completion_tokens >= 1
