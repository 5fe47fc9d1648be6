"""Logprobs, prompt scoring and logit_bias through the official ``openai`` SDK and a real server.

The values are checked against HF transformers (the base) and peft (an adapter): log_softmax over
the prompt, as lm-evaluation-harness's ``local-completions`` reads it back from ``echo`` +
``logprobs`` + ``max_tokens`` 0 (or 1). The server prefills in chunks of 32 tokens and batches up
to 4 sequences, so scoring requests share steps with generating requests of another adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.api.server_process import ServerProcess, running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

BASE = "tiny-base"
SCORER, OTHER = "lora-score", "lora-other"
MAX_LOGPROBS = 5
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."  # 82 tokens
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
K = 3


@dataclass(frozen=True)
class Setup:
    server: ServerProcess
    model_dir: Path
    adapter_dirs: dict[str, Path]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("logprobs-api")
    model_dir = write_tiny_llama(root / "model")
    adapter_dirs = {
        SCORER: save_peft_adapter(model_dir, root / SCORER, seed=31, r=8, lora_alpha=16,
                                  target_modules=["q_proj", "v_proj", "up_proj"]),
        OTHER: save_peft_adapter(model_dir, root / OTHER, seed=32, r=4, lora_alpha=8,
                                 target_modules=["o_proj"]),
    }  # fmt: skip
    args = [
        "--model", str(model_dir), "--served-model-name", BASE, "--data-dir", str(root / "data"),
        "--max-lora-rank", "16", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
        "--max-logprobs", str(MAX_LOGPROBS), "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    for name, path in adapter_dirs.items():
        args += ["--adapter", f"{name}={path}"]
    with running_server(args, root / "server.log") as running:
        yield Setup(running, model_dir, adapter_dirs)


@pytest.fixture(scope="module")
def client(setup: Setup) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{setup.server.url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        yield oai


@pytest.fixture(scope="module")
def tokenizer(setup: Setup):
    return AutoTokenizer.from_pretrained(setup.model_dir)


@pytest.fixture(scope="module")
def references(setup: Setup) -> dict[str, torch.nn.Module]:
    """HF's base model and peft's model of each adapter, by served name."""
    models = {BASE: AutoModelForCausalLM.from_pretrained(setup.model_dir).eval()}
    for name, path in setup.adapter_dirs.items():
        models[name] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(setup.model_dir), path
        ).eval()
    return models


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len - 1, V]: row i is log_softmax of the logits after token_ids[: i + 1], in fp64."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1)


def greedy_ids(model, prompt: list[int], num_tokens: int) -> list[int]:
    """What greedy decoding with ``model`` generates after ``prompt`` (the server's, with ignore_eos)."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(hf_logprobs(model, [*ids, 0])[-1].argmax()))
    return ids[len(prompt) :]


def expected_top(tokenizer, row: torch.Tensor, chosen: int, k: int) -> dict[str, float]:
    """vLLM's completions top_logprobs entry: the chosen token first, then the k most likely, by text."""
    entries = {tokenizer.decode([chosen]): float(row[chosen])}
    for token_id in row.topk(k).indices.tolist():
        entries.setdefault(tokenizer.decode([token_id]), float(row[token_id]))
    return entries


def assert_scored(logprobs, tokenizer, model, token_ids: list[int], k: int, num_prompt: int) -> None:
    """Every token of ``token_ids`` (the prompt, then what was generated) scored as ``model`` does."""
    expected = hf_logprobs(model, token_ids)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in token_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i, token_id in enumerate(token_ids[1:]):
        row = expected[i]
        assert logprobs.token_logprobs[i + 1] == pytest.approx(float(row[token_id]), abs=2e-4), (
            f"token {i + 1}"
        )
        want = expected_top(tokenizer, row, token_id, k)
        got = logprobs.top_logprobs[i + 1]
        assert list(got) == list(want), f"token {i + 1}"
        assert list(got.values()) == pytest.approx(list(want.values()), abs=2e-4)
    assert logprobs.text_offset[:num_prompt] == list(range(num_prompt))  # one ASCII character a token


# ---- prompt scoring ----
@pytest.mark.parametrize("model", [BASE, SCORER])
def test_echo_with_max_tokens_0_scores_the_prompt_as_hf_and_peft(client, tokenizer, references, model):
    prompt_ids = tokenizer.encode(TEXT)
    for prompt in (TEXT, prompt_ids):
        response = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=K)
        [choice] = response.choices
        assert (choice.text, choice.finish_reason) == (TEXT, "length")
        assert_scored(choice.logprobs, tokenizer, references[model], prompt_ids, K, len(prompt_ids))
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), 0)


def test_a_batch_of_prompts_is_scored_prompt_by_prompt(client, tokenizer, references):
    """lm-evaluation-harness's shape: a list of token-id prompts, echo, logprobs 1, max_tokens 1;
    each choice's lists are its prompt's, then the one generated token's."""
    prompts = [tokenizer.encode(TEXT[:30]), tokenizer.encode(TEXT), tokenizer.encode("Hi")]
    response = client.completions.create(
        model=SCORER, prompt=prompts, max_tokens=1, echo=True, logprobs=1, n=2, **GREEDY
    )
    assert [c.index for c in response.choices] == list(range(6))
    for choice in response.choices:
        prompt = prompts[choice.index // 2]
        generated = greedy_ids(references[SCORER], prompt, 1)
        assert choice.text == tokenizer.decode(prompt + generated)
        assert_scored(choice.logprobs, tokenizer, references[SCORER], prompt + generated, 1, len(prompt))
    assert response.usage.prompt_tokens == sum(map(len, prompts))
    assert response.usage.completion_tokens == 6


def test_scoring_in_a_batch_with_other_adapters_generating(client, tokenizer, references):
    """Scoring requests of the base and an adapter alongside streamed generations of another adapter:
    the scores are HF's and peft's, the generations what they are alone."""
    alone = client.completions.create(model=OTHER, prompt=TEXT[:20], max_tokens=24, **GREEDY).choices[0].text
    prompt_ids = tokenizer.encode(TEXT)

    def generate() -> str:
        stream = client.completions.create(
            model=OTHER, prompt=TEXT[:20], max_tokens=24, stream=True, **GREEDY
        )
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    def score(model: str):
        return client.completions.create(model=model, prompt=TEXT, max_tokens=0, echo=True, logprobs=K)

    with ThreadPoolExecutor(4) as pool:
        generations = [pool.submit(generate) for _ in range(2)]
        scores = {model: pool.submit(score, model) for model in (BASE, SCORER)}
        for model, future in scores.items():
            logprobs = future.result().choices[0].logprobs
            assert_scored(logprobs, tokenizer, references[model], prompt_ids, K, len(prompt_ids))
        assert [g.result() for g in generations] == [alone, alone]


def test_echo_with_generation_scores_prompt_and_completion(client, tokenizer, references):
    response = client.completions.create(
        model=SCORER, prompt=TEXT, max_tokens=5, echo=True, logprobs=2, **GREEDY
    )
    [choice] = response.choices
    token_ids = tokenizer.encode(TEXT) + greedy_ids(references[SCORER], tokenizer.encode(TEXT), 5)
    assert choice.text == TEXT + tokenizer.decode(token_ids[-5:])
    assert_scored(choice.logprobs, tokenizer, references[SCORER], token_ids, 2, len(tokenizer.encode(TEXT)))
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)


def test_a_streamed_echo_sends_the_prompt_in_the_first_chunk(client, tokenizer):
    """As vLLM streams it: the first chunk carries the prompt and the first token, with their
    logprobs; the chunks together equal the whole response."""
    request = dict(model=SCORER, prompt=TEXT[:40], max_tokens=4, echo=True, logprobs=2, **GREEDY)
    whole = client.completions.create(**request).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **request) if c.choices]
    assert chunks[0].text.startswith(TEXT[:40]) and len(chunks[0].logprobs.tokens) == 41
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    streamed = [v for c in chunks for v in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
    assert [o for c in chunks for o in c.logprobs.text_offset] == whole.logprobs.text_offset
    streamed_tops = [d for c in chunks for d in c.logprobs.top_logprobs]
    assert streamed_tops[0] is None and [list(d) for d in streamed_tops[1:]] == [
        list(d) for d in whole.logprobs.top_logprobs[1:]
    ]
    flat = [v for d in streamed_tops[1:] for v in d.values()]
    assert flat == pytest.approx([v for d in whole.logprobs.top_logprobs[1:] for v in d.values()], abs=1e-5)


def test_completion_logprobs_k_gives_k_alternatives_per_generated_token(client, tokenizer, references):
    prompt_ids = tokenizer.encode(TEXT[:12])
    choice = client.completions.create(
        model=BASE, prompt=TEXT[:12], max_tokens=6, logprobs=4, **GREEDY
    ).choices[0]
    generated = greedy_ids(references[BASE], prompt_ids, 6)
    assert choice.text == tokenizer.decode(generated)
    expected = hf_logprobs(references[BASE], prompt_ids + generated)[len(prompt_ids) - 1 :]
    assert len(choice.logprobs.top_logprobs) == len(generated) == 6
    for i, (token_id, top) in enumerate(zip(generated, choice.logprobs.top_logprobs, strict=True)):
        want = expected_top(tokenizer, expected[i], token_id, 4)
        assert list(top) == list(want) and list(top.values()) == pytest.approx(list(want.values()), abs=2e-4)


# ---- chat ----
def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_top_logprobs_are_peft_alternatives(client, tokenizer, references, stream):
    """Each content entry's top_logprobs are peft's K most likely tokens at that step (greedy: the
    chosen token is the first of them), streamed or not."""
    messages = [{"role": "user", "content": "Say something."}]
    response = client.chat.completions.create(
        model=SCORER, messages=messages, max_tokens=6, logprobs=True, top_logprobs=K, stream=stream, **GREEDY
    )
    if stream:
        content = [
            e for c in response if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
    else:
        content = response.choices[0].logprobs.content
    assert len(content) == 6
    ids = chat_prompt_ids(tokenizer, messages)
    for entry in content:
        row = hf_logprobs(references[SCORER], [*ids, 0])[-1]  # the distribution after ids
        values, top_ids = row.topk(K)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in top_ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=2e-4)
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs)
        assert (entry.token, entry.logprob) == (
            entry.top_logprobs[0].token,
            pytest.approx(values[0].item(), abs=2e-4),
        )
        ids = [*ids, top_ids[0].item()]


# ---- logit_bias ----
def test_logit_bias_forces_and_bans_tokens_beside_an_unbiased_request(client, tokenizer, references):
    """+100 on a token makes every token that one (greedy and sampled), -100 on the first token an
    unbiased run picks bans it; an unbiased request running at the same time is unchanged."""
    forced = tokenizer.encode("Z")[0]
    alone = client.completions.create(model=OTHER, prompt=TEXT[:20], max_tokens=16, **GREEDY).choices[0].text
    row = hf_logprobs(references[SCORER], [*tokenizer.encode("Hi"), 0])[-1]
    first, second = row.topk(2).indices.tolist()

    def biased(**kwargs):
        return client.completions.create(model=SCORER, prompt="Hi", max_tokens=6, **kwargs).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        unbiased = pool.submit(
            lambda: (
                client.completions.create(model=OTHER, prompt=TEXT[:20], max_tokens=16, **GREEDY)
                .choices[0]
                .text
            )
        )
        greedy = pool.submit(biased, logit_bias={str(forced): 100}, **GREEDY)
        sampled = pool.submit(biased, logit_bias={str(forced): 100}, temperature=1.0, seed=5)
        banned = pool.submit(
            lambda: (
                client.completions.create(
                    model=SCORER,
                    prompt="Hi",
                    max_tokens=1,
                    logprobs=0,
                    logit_bias={str(first): -100},
                    **GREEDY,
                )
                .choices[0]
                .logprobs
            )
        )
        assert greedy.result() == sampled.result() == "Z" * 6
        # the runner-up wins, and its logprob is the raw one (the bias is not in the distribution)
        assert banned.result().tokens == [tokenizer.decode([second])]
        assert banned.result().token_logprobs == pytest.approx([float(row[second])], abs=2e-4)
        assert unbiased.result() == alone
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        logit_bias={str(forced): 100},
        **GREEDY,
    )
    assert chat.choices[0].message.content == "ZZZ"


# ---- refusals ----
def test_refusals_name_the_parameter(client):
    cases = [
        ("logprobs", lambda: client.completions.create(model=BASE, prompt="x", logprobs=MAX_LOGPROBS + 1)),
        ("logprobs", lambda: client.completions.create(model=BASE, prompt="x", echo=True, max_tokens=0,
                                                       logprobs=MAX_LOGPROBS + 1)),
        ("max_tokens", lambda: client.completions.create(model=BASE, prompt="x", max_tokens=0)),
        ("top_logprobs", lambda: client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x"}], logprobs=True,
            top_logprobs=MAX_LOGPROBS + 1)),
        ("logit_bias", lambda: client.completions.create(model=BASE, prompt="x", logit_bias={"100000": 1})),
        ("logit_bias", lambda: client.completions.create(model=BASE, prompt="x", logit_bias={"1": 101})),
    ]  # fmt: skip
    for param, call in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.status_code == 400 and caught.value.body["param"] == param, caught.value.body
    ok = client.completions.create(model=BASE, prompt="x", logprobs=MAX_LOGPROBS, max_tokens=1)
    assert len(ok.choices[0].logprobs.top_logprobs[0]) >= MAX_LOGPROBS
