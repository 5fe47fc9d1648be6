"""The sampler agrees with transformers' logits processors and keeps seeded requests reproducible."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.sampler import (
    MAX_STOP_STRINGS,
    SCORING_ROWS,
    Sampler,
    SamplingParams,
    make_generator,
    process_logits,
    token_logprobs,
)

CPU = torch.device("cpu")


@dataclass
class Row:
    """Minimal SamplingRow."""

    sampling: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


def seeded_row(params: SamplingParams, **kwargs) -> Row:
    assert params.seed is not None
    return Row(params, generator=make_generator(params.seed, CPU), **kwargs)


def hf_reference(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """What transformers' processor chain makes of one row's logits [V]; OpenAI penalties by hand."""
    p = row.sampling
    scores = logits.float().clone().unsqueeze(0)  # [1, V]
    input_ids = torch.tensor([row.prompt_token_ids + row.output_token_ids], dtype=torch.int64)  # [1, L]
    if p.logit_bias:
        bias = {(token_id,): value for token_id, value in p.logit_bias}
        scores = SequenceBiasLogitsProcessor(bias)(input_ids, scores)
    if p.repetition_penalty != 1.0 and input_ids.numel():
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, scores)
    for token, count in Counter(row.output_token_ids).items():
        if 0 <= token < scores.shape[1]:
            scores[0, token] -= p.presence_penalty + p.frequency_penalty * count
    if p.is_greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(p.temperature)(input_ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(input_ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(input_ids, scores)
    return scores[0]


def random_logits(gen: torch.Generator, batch: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=gen) * scale  # [B, V]


def mixed_rows(vocab: int) -> list[Row]:
    """One batch covering every processing step, alone and combined."""
    prompt = [1, 3, 3, 7, vocab + 5]  # the out-of-vocabulary id is ignored, as in transformers
    output = [3, 9, 9, 9, 11]
    return [
        Row(SamplingParams(temperature=0.7)),
        Row(SamplingParams(top_k=5)),
        Row(SamplingParams(top_p=0.9)),
        Row(
            SamplingParams(temperature=1.3, top_k=20, top_p=0.8, repetition_penalty=1.2), None, prompt, output
        ),
        Row(SamplingParams(temperature=0.0, repetition_penalty=1.5), None, prompt, output),
        Row(SamplingParams(top_k=1000)),  # more than the vocabulary: no-op
        Row(SamplingParams(temperature=0.3, top_p=0.5)),
        Row(SamplingParams(top_k=-1, top_p=1.0)),
        Row(SamplingParams(repetition_penalty=0.8, top_p=0.95), None, prompt, output),
        Row(SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4, top_k=8), None, prompt, output),
        Row(
            SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=1.5),
            None,
            prompt,
            output,
        ),
        Row(SamplingParams(temperature=2.0, top_k=3, top_p=0.3, seed=4), None, [], output),
        Row(SamplingParams(temperature=0.0, logit_bias={3: 2.5, 9: -100, 0: 0.5}), None, prompt, output),
        Row(
            SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.3, logit_bias={5: 4}), None, prompt
        ),
    ]


# --- process_logits against transformers -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_process_logits_matches_transformers_chain(dtype):
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    rows = mixed_rows(vocab)
    logits = random_logits(gen, len(rows), vocab).to(dtype)
    got = process_logits(logits, rows)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    for i, row in enumerate(rows):
        expected = hf_reference(logits[i], row)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(expected)), f"row {i}: support differs"
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6, msg=f"row {i}")
    assert not torch.equal(logits.float(), got), "the chain must have changed something"


@pytest.mark.parametrize(
    "params,kept",
    [
        (SamplingParams(top_p=0.75), 3),  # cumulative 0.25 == 1 - top_p exactly: that token goes (<=)
        (SamplingParams(top_p=1e-9), 1),  # even the top token is past the cut: min_tokens_to_keep=1
        (SamplingParams(top_k=2, top_p=1e-9), 1),
    ],
)
def test_top_p_boundaries_match_transformers(params, kept):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.4, 0.3, 0.2]])  # [2, 4]; row 0 exact quarters
    rows = [Row(params), Row(params)]
    got = process_logits(logits, rows)
    expected = torch.stack([hf_reference(logits[i], row) for i, row in enumerate(rows)])
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert int(torch.isfinite(got[0]).sum()) == kept
    if kept == 1:
        assert Sampler().sample(logits[1:], rows[1:]).token_ids == [1]


def test_process_logits_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="logits"):
        process_logits(torch.zeros(3, 10), [Row(SamplingParams())] * 2)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=6),
        SamplingParams(temperature=0.8, top_p=0.85),
        SamplingParams(temperature=1.5, top_k=10, top_p=0.9, repetition_penalty=1.3),
    ],
)
def test_draws_follow_transformers_distribution(params):
    """Many unseeded draws of one row: drawn set == HF support, frequencies ≈ HF softmax."""
    gen = torch.Generator().manual_seed(1)
    vocab, draws = 32, 8000
    row = Row(params, None, [2, 4, 6], [4, 8])
    logits = random_logits(gen, 1, vocab, scale=2.0)
    expected_probs = hf_reference(logits[0], row).softmax(-1)  # [V]
    support = set(torch.nonzero(expected_probs).flatten().tolist())
    assert 1 < len(support) < vocab, "test case must actually filter"
    out = Sampler(seed=7).sample(logits.expand(draws, vocab), [row] * draws)
    drawn = Counter(out.token_ids)
    assert set(drawn) <= support
    assert {t for t in support if expected_probs[t] > 0.005} <= set(drawn)
    freq = torch.tensor([drawn[t] / draws for t in range(vocab)])
    torch.testing.assert_close(freq, expected_probs, rtol=0, atol=0.025)


def test_seeded_draws_stay_in_transformers_support():
    """Each row with its own generator, many seeds: every draw lies in the HF support."""
    gen = torch.Generator().manual_seed(2)
    vocab = 48
    logits = random_logits(gen, 1, vocab)
    rows = [seeded_row(SamplingParams(seed=s, temperature=1.2, top_k=12, top_p=0.9)) for s in range(400)]
    support = set(torch.nonzero(hf_reference(logits[0], rows[0]) > -math.inf).flatten().tolist())
    drawn = set(Sampler().sample(logits.expand(len(rows), vocab), rows).token_ids)
    assert drawn <= support
    assert len(drawn) > 1, "400 seeds should not all pick the same token"


# --- greedy ---------------------------------------------------------------------------------------------


def test_greedy_rows_take_argmax_of_penalised_logits():
    gen = torch.Generator().manual_seed(3)
    vocab = 50
    rows = mixed_rows(vocab)
    logits = random_logits(gen, len(rows), vocab)
    out = Sampler().sample(logits, rows)
    for i, row in enumerate(rows):
        if row.sampling.is_greedy:
            assert out.token_ids[i] == int(hf_reference(logits[i], row).argmax())
    plain = [Row(SamplingParams(temperature=0.0)) for _ in range(8)]
    logits = random_logits(gen, len(plain), vocab)
    assert Sampler().sample(logits, plain).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    gen = torch.Generator().manual_seed(4)
    logits = random_logits(gen, 64, 100, scale=0.5)
    rows = [Row(SamplingParams(temperature=2.0, top_k=1)) for _ in range(64)]
    assert Sampler(seed=11).sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_greedy_batch_consumes_no_randomness():
    sampler = Sampler()
    before = sampler.shared_generator(CPU).get_state()
    sampler.sample(torch.randn(4, 30), [Row(SamplingParams(temperature=0.0))] * 4)
    assert torch.equal(sampler.shared_generator(CPU).get_state(), before)


# --- seeds ----------------------------------------------------------------------------------------------


TARGET = SamplingParams(seed=1234, temperature=0.9, top_p=0.97, repetition_penalty=1.1)


def run_target(others: list[Row], position: int, sampler_seed: int, steps: int = 12) -> list[int]:
    """Tokens a request with TARGET params gets over ``steps`` steps, batched at ``position`` among others."""
    vocab = 200
    target_logits = random_logits(torch.Generator().manual_seed(99), steps, vocab, scale=1.0)  # [steps, V]
    noise_gen = torch.Generator().manual_seed(sampler_seed)
    target = seeded_row(TARGET, prompt_token_ids=[5, 6, 7])
    sampler = Sampler(seed=sampler_seed)
    for step in range(steps):
        batch = [*others[:position], target, *others[position:]]
        logits = random_logits(noise_gen, len(batch), vocab)
        logits[position] = target_logits[step]
        token = sampler.sample(logits, batch).token_ids[position]
        target.output_token_ids.append(token)
    return target.output_token_ids


def other_rows() -> list[Row]:
    return [
        Row(SamplingParams(temperature=1.0)),
        seeded_row(SamplingParams(seed=1234, temperature=0.5)),  # same seed, its own generator
        Row(SamplingParams(temperature=0.0)),
        seeded_row(SamplingParams(seed=7, top_k=3)),
        Row(SamplingParams(top_p=0.5, presence_penalty=1.0), None, [1], [2, 2]),
    ]


def test_same_seed_same_tokens_regardless_of_batch():
    alone = run_target([], 0, sampler_seed=0)
    assert len(set(alone)) > 3, "the target must actually be sampling"
    assert run_target(other_rows(), 0, sampler_seed=1) == alone
    assert run_target(other_rows(), 3, sampler_seed=2) == alone
    assert run_target(other_rows()[::-1], 5, sampler_seed=3) == alone
    assert run_target(other_rows()[:2], 1, sampler_seed=4) == alone


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(10, 256)  # uniform: any two seeds agreeing on 10 steps would be a bug
    runs = []
    for seed in range(6):
        row = seeded_row(SamplingParams(seed=seed))
        sampler = Sampler()
        runs.append(tuple(sampler.sample(logits[s : s + 1], [row]).token_ids[0] for s in range(10)))
    assert len(set(runs)) == len(runs)


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(16, 1000)
    rows = [Row(SamplingParams()) for _ in range(16)]
    assert Sampler(seed=5).sample(logits, rows).token_ids == Sampler(seed=5).sample(logits, rows).token_ids
    assert Sampler(seed=5).sample(logits, rows).token_ids != Sampler(seed=6).sample(logits, rows).token_ids


# --- penalties, logprobs --------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_follow_openai_formula():
    vocab = 20
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5))
    output = [3, 3, 5, 7, 7, 7]
    row = Row(
        SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25), None, [1, 4], output
    )
    got = process_logits(logits, [row])[0]
    expected = logits[0].clone()
    expected[3] -= 0.5 + 0.25 * 2
    expected[5] -= 0.5 + 0.25 * 1
    expected[7] -= 0.5 + 0.25 * 3
    assert torch.equal(got, expected)  # prompt tokens 1 and 4 untouched: penalties count output only


def test_repetition_penalty_follows_sign_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    row = Row(SamplingParams(temperature=0.0, repetition_penalty=2.0), None, [0, 1], [1])
    assert torch.equal(process_logits(logits, [row]), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_logprobs_are_raw_log_softmax_of_chosen_token():
    gen = torch.Generator().manual_seed(6)
    vocab = 40
    rows = [
        replace(r, sampling=replace(r.sampling, logprobs=i % 3 != 0)) for i, r in enumerate(mixed_rows(vocab))
    ]
    logits = random_logits(gen, len(rows), vocab).to(torch.bfloat16)
    out = Sampler().sample(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    for i, (row, token, logprob) in enumerate(zip(rows, out.token_ids, out.logprobs, strict=True)):
        if row.sampling.logprobs:
            assert logprob == pytest.approx(float(raw[i, token]), abs=1e-6), f"row {i}"
        else:
            assert logprob is None


def test_top_logprobs_are_the_most_likely_tokens_of_the_raw_distribution():
    """Each row's top_logprobs most likely tokens under the raw logits (before penalties and
    temperature), most likely first, for the rows that ask; () for the others."""
    gen = torch.Generator().manual_seed(8)
    vocab = 50
    ks = [0, 3, 1, 0, 7, 2, 0, 5, 4, 0, 6, 1, 2, 3]
    rows = [
        replace(r, sampling=replace(r.sampling, logprobs=i % 4 != 3, top_logprobs=ks[i]))
        for i, r in enumerate(mixed_rows(vocab))
    ]
    logits = random_logits(gen, len(rows), vocab)
    out = Sampler().sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    for i, (row, top) in enumerate(zip(rows, out.top_logprobs, strict=True)):
        k = row.sampling.num_top_logprobs
        values, ids = raw[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.int64))
        assert [t for t, _ in top] == ids.tolist(), f"row {i}"
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6), f"row {i}"
        assert k == (ks[i] if i % 4 != 3 else 0)


def test_top_logprobs_beyond_the_vocabulary_are_the_whole_vocabulary():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    row = Row(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=20))
    [top] = Sampler().sample(logits, [row]).top_logprobs
    assert [t for t, _ in top] == [2, 1, 0]


def test_logit_bias_forces_and_bans_tokens_beside_unbiased_rows():
    """+100 makes a token the greedy and the sampled choice, -100 bans the argmax; rows without a
    bias get exactly the logits (and tokens) they get alone, and the raw logprobs ignore the bias."""
    gen = torch.Generator().manual_seed(9)
    vocab = 30
    logits = random_logits(gen, 4, vocab)
    top = logits.argmax(-1).tolist()
    plain = [Row(SamplingParams(temperature=0.0)), Row(SamplingParams(temperature=0.8, seed=3))]
    forced = Row(SamplingParams(temperature=1.0, logit_bias={7: 100.0}, logprobs=True))
    banned = Row(SamplingParams(temperature=0.0, logit_bias={top[3]: -100}))
    seeded_plain = [plain[0], seeded_row(plain[1].sampling)]
    out = Sampler().sample(logits, [*seeded_plain, forced, banned])
    assert out.token_ids[2] == 7 and out.token_ids[3] != top[3]
    assert out.token_ids[3] == logits[3].topk(2).indices[1].item()  # the runner-up wins
    alone = Sampler().sample(logits[:2], [plain[0], seeded_row(plain[1].sampling)])
    assert out.token_ids[:2] == alone.token_ids
    processed = process_logits(logits, [*plain, forced, banned])
    assert torch.equal(processed[0], logits[0])
    assert out.logprobs[2] == pytest.approx(float(torch.log_softmax(logits[2], -1)[7]), abs=1e-6)


def test_logit_bias_is_stored_as_sorted_pairs():
    params = SamplingParams(logit_bias={9: 1, 2: -3.5})
    assert params.logit_bias == ((2, -3.5), (9, 1.0))
    assert SamplingParams(logit_bias=[(4, 1.0), (4, 2.0)]).logit_bias == ((4, 2.0),)
    assert SamplingParams(logit_bias={1: 100, 2: -100}).logit_bias == ((1, 100.0), (2, -100.0))


def test_max_tokens_zero_runs_the_prompt_only():
    assert SamplingParams(max_tokens=0, prompt_logprobs=2).max_tokens == 0


# --- SamplingParams validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field_name,value",
    [
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -5),
        ("top_k", 2.5),
        ("top_k", True),
        ("seed", 1.5),
        ("seed", 2**64),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3),
        ("frequency_penalty", math.nan),
        ("stop", ("x",) * (MAX_STOP_STRINGS + 1)),
        ("stop", ("",)),
        ("stop", (1,)),
        ("stop", 5),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", ("a",)),
        ("ignore_eos", "yes"),
        ("logprobs", 1),
        ("top_logprobs", -1),
        ("top_logprobs", 1.0),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", True),
        ("logit_bias", {1: 100.5}),
        ("logit_bias", {1: -101}),
        ("logit_bias", {1: math.nan}),
        ("logit_bias", {1: math.inf}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
        ("logit_bias", {1.5: 1.0}),
        ("logit_bias", {1: "2"}),
        ("logit_bias", 5),
        ("logit_bias", [(1, 2, 3)]),
    ],
)
def test_invalid_params_raise_naming_the_field(field_name, value):
    with pytest.raises(ValueError, match=rf"^{field_name}\b"):
        SamplingParams(**{field_name: value})


def test_valid_params_are_normalised():
    p = SamplingParams(temperature=1, stop=["a", "bc"], stop_token_ids=[2, 3], presence_penalty=-2)
    assert p.stop == ("a", "bc") and p.stop_token_ids == (2, 3)
    assert isinstance(p.temperature, float) and isinstance(p.presence_penalty, float)
    assert SamplingParams(stop="end").stop == ("end",)
    hash(p)  # frozen and hashable once lists became tuples
    edges = [
        SamplingParams(top_p=1.0, top_k=-1, frequency_penalty=2.0, max_tokens=1),
        SamplingParams(top_k=0, seed=0, stop=("s",) * MAX_STOP_STRINGS),
        SamplingParams(top_k=1, repetition_penalty=1e-3, seed=-1),
    ]
    assert not any(e.is_greedy for e in edges)
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(temperature=0.0).is_greedy


def test_token_logprobs_in_row_blocks_equal_one_log_softmax_over_all_rows():
    """Scoring more rows than SCORING_ROWS (in blocks of rows) gives every row's logprob and its
    own number of alternatives as one log_softmax over all rows does (float32 logits: no ties)."""
    num_rows, vocab = 2 * SCORING_ROWS + 37, 300
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, vocab, (num_rows,), generator=torch.Generator().manual_seed(4))
    num_top = [i % 4 for i in range(num_rows)]  # 0..3 alternatives, across the block boundaries
    scored = token_logprobs(logits, targets, num_top)
    reference = torch.log_softmax(logits, dim=-1)
    assert scored.logprobs == reference.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    for i, alternatives in enumerate(scored.top_logprobs):
        values, ids = reference[i].topk(num_top[i])
        assert alternatives == tuple(zip(ids.tolist(), values.tolist(), strict=True)), i
