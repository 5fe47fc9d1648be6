"""The CPU fast path of the LoRA side path agrees with the token-by-token reference."""

import pytest
import torch

from server.ops.lora_torch import LoRASegments, add_lora, add_lora_reference


def _random_case(gen, num_tokens_per_seg, slices, num_slots, rank, in_features):
    out_total = slices[-1][1]
    lora_a = torch.randn(num_slots, len(slices), rank, in_features, generator=gen)
    lora_b = torch.randn(out_total, num_slots, rank, generator=gen)
    token_slots = [s for s, n in num_tokens_per_seg for _ in range(n)]
    x = torch.randn(len(token_slots), in_features, generator=gen)
    y = torch.randn(len(token_slots), out_total, generator=gen)
    return x, y, lora_a, lora_b, token_slots


CASES = [
    # (segments as (slot, tokens), output slices, slots, rank)
    ([(0, 1), (3, 1), (1, 1), (-1, 1), (2, 1)], ((0, 48),), 4, 8),  # decode, one token each
    ([(2, 17), (-1, 5), (0, 30)], ((0, 32), (32, 40), (40, 48)), 4, 16),  # prefill, fused qkv-like
    ([(1, 3), (0, 1)], ((0, 24), (24, 48)), 2, 4),  # gate_up-like, mixed
    ([(-1, 6)], ((0, 16),), 3, 8),  # no adapter at all
    ([(5, 2), (-1, 3), (4, 9), (0, 1)], ((0, 40),), 8, 32),
]


@pytest.mark.parametrize("segs,slices,num_slots,rank", CASES)
def test_fast_path_matches_reference(segs, slices, num_slots, rank):
    gen = torch.Generator().manual_seed(0)
    x, y, lora_a, lora_b, token_slots = _random_case(gen, segs, slices, num_slots, rank, 24)
    segments = LoRASegments.build(token_slots, torch.device("cpu"), torch.float32)
    expected, got = y.clone(), y.clone()
    add_lora_reference(expected, x, lora_a, lora_b, segments, slices)
    add_lora(got, x, lora_a, lora_b, segments, slices)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    if all(s < 0 for s, _ in segs):
        assert torch.equal(got, y), "tokens without an adapter must get exactly the base output"


def test_both_fast_strategies_agree():  # padded grid (with gaps and pads) vs segment loop
    gen = torch.Generator().manual_seed(1)
    segs = [(0, 9), (-1, 3), (2, 2), (1, 7)]
    x, y, lora_a, lora_b, token_slots = _random_case(gen, segs, ((0, 20), (20, 30)), 4, 8, 16)
    segments = LoRASegments.build(token_slots, torch.device("cpu"), torch.float32)
    from server.ops import lora_torch

    grid, looped = y.clone(), y.clone()
    lora_b_slots = lora_b.permute(1, 0, 2)
    lora_torch._add_lora_grid(grid, x, lora_a, lora_b_slots, segments, ((0, 20), (20, 30)))
    lora_torch._add_lora_segments(looped, x, lora_a, lora_b_slots, segments, ((0, 20), (20, 30)))
    torch.testing.assert_close(grid, looped, rtol=1e-5, atol=1e-4)


def test_non_contiguous_slot_runs_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        LoRASegments.build([0, 1, 0], torch.device("cpu"), torch.float32)
