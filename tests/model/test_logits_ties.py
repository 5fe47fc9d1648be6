"""The LM head's bf16 rounding must not decide a greedy pick: tied maxima are recomputed exactly."""

from __future__ import annotations

import torch

from server.model.llama import refine_top_ties


def _rounded_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a bf16 GEMM returns (fp32 accumulation, rounded to bf16), as the fp32 the sampler reads."""
    return (hidden.float() @ weight.float().T).to(torch.bfloat16).float()


def test_two_tokens_tied_by_bf16_rounding_are_told_apart():
    hidden = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)  # [1, H]
    weight = torch.tensor([[24.0, 1.25], [24.0, 1.28125]], dtype=torch.bfloat16)  # 25.25 and 25.28125
    logits = _rounded_logits(hidden, weight)
    assert logits[0, 0] == logits[0, 1], "both round to 25.25: bf16 steps are 0.125 there"
    refined = refine_top_ties(logits, hidden, weight)
    assert refined.argmax(-1).item() == 1 and refined[0, 1].item() == 25.28125


def test_greedy_picks_match_the_exact_products_on_random_rows():
    torch.manual_seed(0)
    hidden = torch.randn(256, 64).to(torch.bfloat16)  # [B, H]
    weight = (torch.randn(512, 64) * 0.6).to(torch.bfloat16)  # [V, H]: logits of about ±25
    exact = (hidden.float() @ weight.float().T).argmax(-1)
    rounded = _rounded_logits(hidden, weight)
    assert (rounded.argmax(-1) != exact).any(), "no row decided by rounding: the test would prove nothing"
    refined = refine_top_ties(rounded.clone(), hidden, weight)
    assert torch.equal(refined.argmax(-1), exact)
    untied = refined != rounded
    assert untied.sum() <= 3 * hidden.shape[0], "only the tied maxima are recomputed"


def test_fp32_logits_are_left_alone():
    hidden, weight = torch.randn(4, 8), torch.randn(16, 8)
    logits = hidden @ weight.T
    assert refine_top_ties(logits.clone(), hidden, weight).equal(logits)


def test_rows_past_the_first_block_are_refined_with_their_own_hidden_states():
    torch.manual_seed(1)
    hidden = torch.randn(700, 64).to(torch.bfloat16)  # more rows than one tie-check block
    weight = (torch.randn(512, 64) * 0.6).to(torch.bfloat16)
    exact = (hidden.float() @ weight.float().T).argmax(-1)
    refined = refine_top_ties(_rounded_logits(hidden, weight), hidden, weight)
    assert torch.equal(refined.argmax(-1), exact)
