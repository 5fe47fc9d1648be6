"""The Triton SGMV LoRA kernels agree with the token-by-token reference (interpreter on CPU)."""

import itertools
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set before import

pytest.importorskip("triton")

from server.ops.lora_torch import LoRASegments, add_lora_reference
from server.ops.lora_triton import add_lora

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCES = {  # (rtol, atol)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (3e-2, 1e-1),
}


def _random_slices(rng: random.Random, num_slices: int) -> tuple[tuple[int, int], ...]:
    """Contiguous output column ranges of different widths (qkv-like when N=3)."""
    widths = [rng.choice([8, 16, 24, 40, 72]) for _ in range(num_slices)]
    bounds = [sum(widths[:i]) for i in range(num_slices + 1)]
    return tuple(itertools.pairwise(bounds))


def _random_segments(rng: random.Random, num_slots: int, prefill: bool) -> list[tuple[int, int]]:
    """(slot, tokens) runs: each used slot once, base-only (-1) runs sprinkled in between."""
    slots = rng.sample(range(num_slots), rng.randint(1, num_slots))
    segs: list[tuple[int, int]] = []
    for slot in slots:
        if rng.random() < 0.3:
            segs.append((-1, rng.randint(1, 5)))
        segs.append((slot, rng.randint(5, 100) if prefill and rng.random() < 0.6 else 1))
    return segs


def _random_weights(gen, num_slots, num_slices, rank, in_features, out_total, true_ranks):
    """Slot buffers padded with zeros beyond each slot's true adapter rank."""
    lora_a = torch.randn(num_slots, rank, num_slices, in_features, generator=gen)  # [S, R, N, in]
    lora_b = torch.randn(num_slots, rank, out_total, generator=gen) / rank**0.5  # [S, R, out]
    for slot, true_rank in enumerate(true_ranks):
        lora_a[slot, true_rank:] = 0
        lora_b[slot, true_rank:] = 0
    return lora_a, lora_b


def _case(seed: int, num_slices: int, rank: int, prefill: bool):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_slots = rng.randint(1, 8)
    in_features, slices = rng.randint(16, 96), _random_slices(rng, num_slices)
    true_ranks = [rng.randint(1, rank) for _ in range(num_slots)]
    lora_a, lora_b = _random_weights(gen, num_slots, num_slices, rank, in_features, slices[-1][1], true_ranks)
    token_slots = [s for s, n in _random_segments(rng, num_slots, prefill) for _ in range(n)]
    x = torch.randn(len(token_slots), in_features, generator=gen)  # [T, in]
    y = torch.randn(len(token_slots), slices[-1][1], generator=gen)  # [T, out_total]
    return x, y, lora_a, lora_b, token_slots, slices


def _check(x, y, lora_a, lora_b, token_slots, slices, dtype):
    x, y, lora_a, lora_b = (t.to(DEVICE, dtype) for t in (x, y, lora_a, lora_b))
    segments = LoRASegments.build(token_slots, DEVICE)
    expected, got = y.clone(), y.clone()
    add_lora_reference(expected, x, lora_a, lora_b, segments, slices)
    add_lora(got, x, lora_a, lora_b, segments, slices)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    base = segments.token_slots < 0
    assert torch.equal(got[base], y[base]), "base-only tokens must keep exactly the base output"


# (num_slices, rank, prefill): every slice count with every padded rank, decode and prefill-like
SHAPES = [(n, r, (i + n) % 2 == 1) for n in (1, 2, 3) for i, r in enumerate((4, 8, 16, 32))]


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seed", range(len(SHAPES)))
def test_matches_reference_on_random_batches(seed, dtype):
    _check(*_case(seed, *SHAPES[seed]), dtype)


def test_strided_views_and_base_only_batch():
    gen = torch.Generator().manual_seed(7)
    slices = ((0, 24), (24, 32), (32, 40))  # qkv-like with narrow k/v
    lora_a = torch.randn(3, 8, 3, 48, generator=gen)[..., ::2]  # [S, R, N, in=24], strided
    lora_b = torch.randn(3, 40, 8, generator=gen).transpose(1, 2)  # [S, R, out], out-major storage
    x = torch.randn(20, 40, generator=gen)[:, 8:32]  # [T, in] with row stride 40
    y_store = torch.randn(20, 50, generator=gen)
    token_slots = [2] * 9 + [-1] * 3 + [0] * 8
    _check(x, y_store[:, 5:45], lora_a, lora_b, token_slots, slices, torch.float32)
    _check(x[:4], y_store[:4, :40], lora_a, lora_b, [-1] * 4, slices, torch.float32)


def test_strided_y_is_updated_in_place():
    gen = torch.Generator().manual_seed(8)
    lora_a = torch.randn(2, 4, 2, 16, generator=gen).to(DEVICE)  # [S, R, N, in]
    lora_b = torch.randn(2, 4, 24, generator=gen).to(DEVICE)  # [S, R, out]
    x = torch.randn(5, 16, generator=gen).to(DEVICE)  # [T, in]
    segments = LoRASegments.build([1, 1, -1, 0, 0], DEVICE)
    slices = ((0, 16), (16, 24))
    expected = torch.randn(5, 30, generator=gen).to(DEVICE)  # y is the view [:, 3:27] of this
    got = expected.clone()
    add_lora_reference(expected[:, 3:27], x, lora_a, lora_b, segments, slices)
    add_lora(got[:, 3:27], x, lora_a, lora_b, segments, slices)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[:, :3], expected[:, :3]) and torch.equal(got[:, 27:], expected[:, 27:])
