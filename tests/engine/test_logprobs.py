"""Logprobs and logit_bias through the engine, against HF transformers and peft.

Prompt scoring (``prompt_logprobs``) must give every prompt token the log_softmax HF/peft give it,
whether the prompt is prefilled in one step or in chunks, alone or in a batch that mixes adapters
and generating requests; generated tokens' ``top_logprobs`` are the raw distribution's most likely
tokens; ``logit_bias`` changes only the request that carries it.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine.errors import EngineError
from server.engine.sampler import SamplingParams
from server.engine.sequence import Sequence
from tests.engine.test_engine_parity import save_peft_adapter, tokens_of
from tests.engine.tiny import make_core, run_to_completion

LONG_PROMPT = [256, *range(30, 110)]  # 81 tokens: several chunks at max_num_batched_tokens 32
SHORT_PROMPT = [256, 72, 101, 108, 108, 111]
GREEDY = dict(temperature=0.0, ignore_eos=True)
K = 4  # alternatives asked for


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("logprob-adapters")
    return {
        "a": save_peft_adapter(tiny_llama, root / "a", seed=11, r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": save_peft_adapter(tiny_llama, root / "b", seed=12, r=4, lora_alpha=8, target_modules=["o_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def references(tiny_llama, adapters) -> dict[str | None, torch.nn.Module]:
    """HF's base model and peft's model of each adapter."""
    models: dict[str | None, torch.nn.Module] = {
        None: AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    }
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        models[name] = PeftModel.from_pretrained(base, path).eval()
    return models


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len - 1, V]: row i is log_softmax of the logits after token_ids[: i + 1] (fp64)."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1)


def assert_scores(prompt_logprobs, model, prompt: list[int], k: int) -> None:
    """Every prompt token's logprob and its k alternatives against ``model`` (peft or HF)."""
    expected = hf_logprobs(model, prompt)
    assert prompt_logprobs.logprobs[0] is None and prompt_logprobs.top_logprobs[0] is None
    assert len(prompt_logprobs.logprobs) == len(prompt_logprobs.top_logprobs) == len(prompt)
    got = torch.tensor(prompt_logprobs.logprobs[1:], dtype=torch.float64)
    want = expected.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    for i, top in enumerate(prompt_logprobs.top_logprobs[1:]):
        values, ids = expected[i].topk(k)
        assert [t for t, _ in top] == ids.tolist(), f"position {i}"
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=2e-4)


def make_engine(tiny_llama, adapters, **overrides):
    core = make_core(tiny_llama, **{"max_num_batched_tokens": 32, **overrides})
    for name, path in adapters.items():
        core.add_adapter(name, path)
    return core


def test_prompt_logprobs_equal_hf_and_peft_in_a_mixed_chunked_batch(tiny_llama, adapters, references):
    """Base and adapter prompts scored in chunks of a batch with a generating request of another
    adapter: the scores equal HF/peft's, and the generating request's tokens are unchanged."""
    core = make_engine(tiny_llama, adapters)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=K, **GREEDY)
    core.add_request("gen-b", SHORT_PROMPT, SamplingParams(max_tokens=12, **GREEDY), "b")
    core.add_request("score-base", LONG_PROMPT, scoring, None)
    core.add_request("score-a", LONG_PROMPT, scoring, "a")
    core.add_request("short-a", SHORT_PROMPT, SamplingParams(max_tokens=3, prompt_logprobs=0, **GREEDY), "a")
    results = run_to_completion(core)
    cases = [
        ("score-base", None, LONG_PROMPT, K),
        ("score-a", "a", LONG_PROMPT, K),
        ("short-a", "a", SHORT_PROMPT, 0),
    ]
    for request_id, adapter, prompt, k in cases:
        first, *rest = results[request_id]
        assert_scores(first.prompt_logprobs, references[adapter], prompt, k)
        assert all(d.prompt_logprobs is None for d in rest), "the prompt is sent once"
    [scored] = results["score-base"]
    assert (scored.token_ids, scored.finish_reason, scored.num_output_tokens) == ([], "length", 0)
    assert len(tokens_of(results["short-a"])) == 3
    alone = make_engine(tiny_llama, adapters)
    alone.add_request("gen-b", SHORT_PROMPT, SamplingParams(max_tokens=12, **GREEDY), "b")
    assert tokens_of(results["gen-b"]) == tokens_of(run_to_completion(alone)["gen-b"])
    assert all(d.prompt_logprobs is None for d in results["gen-b"])


def test_generated_top_logprobs_equal_peft(tiny_llama, adapters, references):
    """Each generated token's logprob and its alternatives are peft's raw log_softmax, even when the
    token is sampled at a temperature with penalties (they do not change the reported distribution)."""
    core = make_engine(tiny_llama, adapters)
    params = SamplingParams(
        max_tokens=8, temperature=0.7, seed=3, repetition_penalty=1.3, logprobs=True, top_logprobs=K,
        ignore_eos=True,
    )  # fmt: skip
    core.add_request("r", SHORT_PROMPT, params, "a")
    core.add_request("plain", LONG_PROMPT, SamplingParams(max_tokens=8, **GREEDY), "b")
    deltas = run_to_completion(core)["r"]
    tokens = tokens_of(deltas)
    expected = hf_logprobs(references["a"], SHORT_PROMPT + tokens)[len(SHORT_PROMPT) - 1 :]
    logprobs = [v for d in deltas for v in d.logprobs]
    tops = [t for d in deltas for t in d.top_logprobs]
    assert len(logprobs) == len(tops) == len(tokens) == 8
    for i, (token, value, top) in enumerate(zip(tokens, logprobs, tops, strict=True)):
        assert value == pytest.approx(float(expected[i, token]), abs=2e-4)
        values, ids = expected[i].topk(K)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=2e-4)


def test_logit_bias_forces_and_bans_tokens_in_a_mixed_batch(tiny_llama, adapters):
    """+100 on one token makes every generated token that one, -100 on the token an unbiased run
    picks first bans it; an unbiased request of another adapter in the same batch is unchanged."""
    alone = make_engine(tiny_llama, adapters)
    alone.add_request("plain", SHORT_PROMPT, SamplingParams(max_tokens=10, **GREEDY), "b")
    alone.add_request("probe", SHORT_PROMPT, SamplingParams(max_tokens=4, **GREEDY), "a")
    results = run_to_completion(alone)
    plain, probe = tokens_of(results["plain"]), tokens_of(results["probe"])
    core = make_engine(tiny_llama, adapters)
    core.add_request("plain", SHORT_PROMPT, SamplingParams(max_tokens=10, **GREEDY), "b")
    core.add_request(
        "forced", SHORT_PROMPT, SamplingParams(max_tokens=6, logit_bias={65: 100}, **GREEDY), "a"
    )
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=1, logit_bias={66: 100}, ignore_eos=True)
    core.add_request("forced-sampled", LONG_PROMPT, sampled, None)
    core.add_request(
        "banned", SHORT_PROMPT, SamplingParams(max_tokens=4, logit_bias={probe[0]: -100}, **GREEDY), "a"
    )
    results = run_to_completion(core)
    assert tokens_of(results["forced"]) == [65] * 6
    assert tokens_of(results["forced-sampled"]) == [66] * 6
    assert tokens_of(results["banned"])[0] != probe[0]
    assert tokens_of(results["plain"]) == plain


def test_the_engine_refuses_logprobs_over_max_logprobs_and_biases_outside_the_vocabulary(tiny_llama):
    core = make_core(tiny_llama, max_logprobs=5)
    core.validate([1, 2], SamplingParams(logprobs=True, top_logprobs=5, prompt_logprobs=5), None)
    for field, params in [
        ("top_logprobs", SamplingParams(logprobs=True, top_logprobs=6)),
        ("prompt_logprobs", SamplingParams(prompt_logprobs=6)),
        ("logit_bias", SamplingParams(logit_bias={core.vocab_size: 1.0})),
    ]:
        with pytest.raises(EngineError, match=f"^{field}") as caught:
            core.validate([1, 2], params, None)
        assert caught.value.param == field


def test_scoring_positions_resume_where_scoring_stopped():
    """Position p scores token p + 1; after a preemption (or a chunk), only what is not scored yet."""
    seq = Sequence("s", list(range(10)), SamplingParams(prompt_logprobs=1), None, 0)
    assert seq.prompt_scoring_positions(0, 4) == range(0, 4)
    assert seq.prompt_scoring_positions(4, 11) == range(4, 9)  # position 9 predicts the first output
    seq.prompt_logprobs.extend([-1.0] * 6)
    assert seq.prompt_scoring_positions(0, 11) == range(6, 9)
    seq.prompt_logprobs.extend([-1.0] * 3)
    assert not seq.prompt_scoring_positions(0, 11)
    assert not Sequence("t", [1, 2, 3], SamplingParams(), None, 0).prompt_scoring_positions(0, 3)
