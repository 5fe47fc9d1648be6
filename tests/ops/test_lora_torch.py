"""The CPU fast path of the LoRA side path agrees with the token-by-token reference.

Shapes are odd on purpose: ranks 1 to 64, batches of 1, 3 and 8, adapters of different ranks in
one batch, slots in use that do not start at 0, one request alone, all requests on one adapter,
and slots in fp32 under a bf16 base (the mix the CPU tuning may choose).
"""

import pytest
import torch

from server.ops import lora_torch
from server.ops.lora_torch import LoRASegments, add_lora, add_lora_reference

CPU = torch.device("cpu")


def _slot_buffers(gen, num_slots, slices, max_rank, in_features, slot_ranks, dtype=torch.float32):
    """[S, R, N, in] and [S, R, out] buffers holding each slot's adapter at its own rank, zeros above."""
    lora_a = torch.zeros(num_slots, max_rank, len(slices), in_features, dtype=dtype)
    lora_b = torch.zeros(num_slots, max_rank, slices[-1][1], dtype=dtype)
    for slot, rank in enumerate(slot_ranks):
        lora_a[slot, :rank] = torch.randn(rank, len(slices), in_features, generator=gen).to(dtype)
        lora_b[slot, :rank] = (torch.randn(rank, slices[-1][1], generator=gen) / rank**0.5).to(dtype)
    return lora_a, lora_b


def _run_case(segs, slices, slot_ranks, max_rank, in_features=24, base_dtype=torch.float32, seed=0):
    """(fast path result, reference result, base y) for (slot, tokens) runs ``segs``."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b = _slot_buffers(gen, len(slot_ranks), slices, max_rank, in_features, slot_ranks)
    token_slots = [s for s, n in segs for _ in range(n)]
    x = torch.randn(len(token_slots), in_features, generator=gen).to(base_dtype)
    y = torch.randn(len(token_slots), slices[-1][1], generator=gen).to(base_dtype)
    segments = LoRASegments.build(token_slots, CPU, slot_ranks)
    rank = segments.max_rank
    expected, got = y.clone(), y.clone()
    add_lora_reference(expected, x, lora_a, lora_b, segments, slices)  # all R rank rows
    add_lora(got, x, lora_a[:, :rank], lora_b[:, :rank], segments, slices)  # rank-true views
    return got, expected, y


QKV = ((0, 32), (32, 40), (40, 48))
CASES = [
    # (segments as (slot, tokens), output slices, rank of each slot, buffers' max rank)
    ([(0, 1), (3, 1), (1, 1), (-1, 1), (2, 1)], ((0, 48),), [8, 8, 8, 8], 8),  # decode, one token each
    ([(2, 17), (-1, 5), (0, 30)], QKV, [16, 4, 16, 1], 16),  # prefill, fused qkv-like
    ([(1, 3), (0, 1)], ((0, 24), (24, 48)), [4, 4], 4),  # gate_up-like, mixed
    ([(-1, 6)], ((0, 16),), [8, 8, 8], 8),  # no adapter at all
    ([(5, 2), (-1, 3), (4, 9), (0, 1)], ((0, 40),), [32] * 8, 32),
    ([(0, 1)], QKV, [1], 64),  # rank 1 under max rank 64, batch 1
    ([(1, 1), (2, 1), (0, 1)], QKV, [64, 16, 8], 64),  # batch 3, three ranks in one step
    ([(s, 1) for s in range(8)], QKV, [1, 8, 16, 64, 16, 8, 1, 16], 64),  # batch 8, mixed ranks
    ([(3, 8)], ((0, 24), (24, 48)), [16, 16, 16, 16], 64),  # all 8 requests on one adapter
    ([(5, 1), (7, 1), (6, 1)], ((0, 40),), [16] * 8, 64),  # used slots 5..7, not from 0
    ([(6, 1), (-1, 2), (2, 1)], QKV, [0, 0, 8, 0, 0, 0, 16, 0], 16),  # gaps between used slots
]


@pytest.mark.parametrize("segs,slices,slot_ranks,max_rank", CASES)
def test_fast_path_matches_reference(segs, slices, slot_ranks, max_rank):
    got, expected, y = _run_case(segs, slices, slot_ranks, max_rank)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = torch.tensor([s < 0 for s, n in segs for _ in range(n)])
    assert torch.equal(got[base_rows], y[base_rows]), "tokens without an adapter get exactly the base output"


def test_the_step_reads_only_up_to_the_largest_rank_in_use():
    segments = LoRASegments.build([2, 0, -1, 1], CPU, [16, 4, 1, 64])  # slot 3 (rank 64) unused
    assert (segments.first_slot, segments.num_slots_used, segments.max_rank) == (0, 3, 16)
    alone = LoRASegments.build([3, 3], CPU, [16, 4, 1, 64])
    assert (alone.first_slot, alone.num_slots_used, alone.max_rank) == (3, 1, 64)
    assert LoRASegments.build([-1, -1], CPU, [16]).has_lora is False


@pytest.mark.parametrize("segs", [[(s, 1) for s in range(8)], [(2, 20), (0, 7)]], ids=["decode", "prefill"])
def test_fp32_slots_under_a_bf16_base(segs):
    """x and y in bf16, slots in fp32: the side path is computed in fp32 and added into bf16 y."""
    got, expected, y = _run_case(segs, QKV, [16] * 8, 64, base_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=5e-2)
    assert not torch.equal(got, y)


def test_both_fast_strategies_agree():  # padded grid (with gaps and pads) vs segment loop
    gen = torch.Generator().manual_seed(1)
    slices, slot_ranks = ((0, 20), (20, 30)), [8, 2, 5, 8]
    lora_a, lora_b = _slot_buffers(gen, 4, slices, 8, 16, slot_ranks)
    token_slots = [0] * 9 + [-1] * 3 + [2] * 2 + [1] * 7
    x, y = torch.randn(len(token_slots), 16, generator=gen), torch.randn(len(token_slots), 30, generator=gen)
    segments = LoRASegments.build(token_slots, CPU, slot_ranks)
    a, b = lora_a[:3].flatten(1, 2), lora_b[:3]  # what add_lora hands to both strategies
    grid, looped = y.clone(), y.clone()
    lora_torch._add_lora_grid(grid, x, a, b, segments, slices)
    lora_torch._add_lora_segments(looped, x, a, b, segments, slices)
    torch.testing.assert_close(grid, looped, rtol=1e-5, atol=1e-4)


def test_non_contiguous_slot_runs_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        LoRASegments.build([0, 1, 0], CPU)
