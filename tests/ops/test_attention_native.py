"""The compiled decode attention (server/ops/attention_native.c) against the torch reference.

Paged caches with shuffled rows, sequences of different lengths (1 row up to several blocks), head
groupings 1, 3 and 4, fp32 and bf16 activations and caches; the C side must read exactly the
rows the index names and nothing of the padding.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.ops import attention_native, attention_torch


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    kernel = attention_native.load(tmp_path_factory.mktemp("cache"))
    if kernel is None:
        pytest.skip("no C compiler here: the torch path is used")
    return kernel


def _rope_rows(positions: list[int], head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.tensor(positions, dtype=torch.float)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _paged_batch(lens: list[int], rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv_index [Bd, Lmax] (distinct shuffled rows, padded with row 0), kv_lens, kv_bias."""
    g = torch.Generator().manual_seed(seed)
    max_len = max(lens)
    perm = torch.randperm(rows, generator=g)
    index = torch.zeros(len(lens), max_len, dtype=torch.int64)
    used = 0
    for b, n in enumerate(lens):
        index[b, :n] = perm[used : used + n]
        used += n
    pads = torch.arange(max_len)[None, :] >= torch.tensor(lens)[:, None]
    bias = torch.zeros(len(lens), 1, 1, max_len).masked_fill_(pads[:, None, None, :], float("-inf"))
    return index, torch.tensor(lens, dtype=torch.int64), bias


CASES = [  # (lens, H, H_kv, D)
    ([1], 1, 1, 8),
    ([5, 1, 17], 9, 3, 64),
    ([40, 33, 64, 2, 9, 80, 1, 16], 9, 3, 64),
    ([7, 7, 7], 8, 2, 32),
    ([130], 4, 4, 16),
    ([3, 12], 12, 4, 128),
]


@pytest.mark.parametrize("lens,heads,kv_heads,head_dim", CASES)
@pytest.mark.parametrize(
    "act,cache",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_decode_attention_matches_torch(native, lens, heads, kv_heads, head_dim, act, cache):
    rows = sum(lens) + 11
    torch.manual_seed(len(lens) * 31 + head_dim)
    k_cache = torch.randn(kv_heads, rows, head_dim).to(cache)
    v_cache = torch.randn(kv_heads, rows, head_dim).to(cache)
    q = torch.randn(len(lens), heads, head_dim).to(act)
    index, kv_lens, bias = _paged_batch(lens, rows, seed=head_dim)
    scale = head_dim**-0.5
    want = attention_torch.decode_attention(
        q.float(), k_cache.float(), v_cache.float(), index, kv_lens, bias, scale
    )  # fp32 reference on the same (rounded) inputs
    got = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, scale)
    assert got.shape == q.shape and got.dtype == act
    tol = 1e-5 if act == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [2, 3, 30])  # more threads than (sequence, kv head) pairs too
def test_decode_attention_on_threads_gives_the_one_thread_result(native, threads):
    lens = [40, 33, 64, 2, 9, 80, 1, 16]
    k_cache, v_cache = torch.randn(3, 260, 64), torch.randn(3, 260, 64)
    index, kv_lens, bias = _paged_batch(lens, 260, seed=5)
    q = torch.randn(len(lens), 9, 64)
    try:
        native.num_threads = 1
        alone = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 0.125)
        native.num_threads = threads
        shared = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 0.125)
    finally:
        native.num_threads = None
    assert torch.equal(shared, alone)  # each pair on one thread, computed the same way


def test_decode_attention_never_reads_padding_or_other_rows(native):
    lens = [3, 1, 6]
    rows = 32
    k_cache, v_cache = torch.randn(2, rows, 16), torch.randn(2, rows, 16)
    index, kv_lens, bias = _paged_batch(lens, rows, seed=3)
    q = torch.randn(3, 4, 16)
    before = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 0.25)
    named = set(index[0, :3].tolist() + index[1, :1].tolist() + index[2, :6].tolist())
    for row in set(range(rows)) - named:  # rows no sequence owns, padding's row 0 included
        k_cache[:, row], v_cache[:, row] = float("nan"), float("nan")
    after = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 0.25)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", [(1, 1, 1, 8), (8, 9, 3, 64), (37, 8, 2, 32), (3, 4, 4, 128)]
)
def test_rope_and_cache_matches_torch(native, dtype, tokens, heads, kv_heads, head_dim):
    rows = tokens * 2 + 5
    torch.manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    cos, sin = _rope_rows(list(range(3, 3 + tokens)), head_dim, dtype)
    write = torch.randperm(rows)[:tokens]
    caches = {
        k: (
            torch.zeros(kv_heads, rows, head_dim, dtype=dtype),
            torch.zeros(kv_heads, rows, head_dim, dtype=dtype),
        )
        for k in "tn"
    }
    want_q = attention_torch.rope_and_cache(qkv.float(), cos.float(), sin.float(), write,
                                            *[c.float() for c in caches["t"]], heads, kv_heads)  # fmt: skip
    got_q = native.rope_and_cache(qkv, cos, sin, write, *caches["n"], heads, kv_heads)
    exact = dtype == torch.float32  # fp32: the same roundings as torch's ops; bf16: rounded once
    tol = {"atol": 0, "rtol": 0} if exact else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(got_q.float(), want_q, **tol)
    want_k = torch.zeros(kv_heads, rows, head_dim)
    want_v = torch.zeros(kv_heads, rows, head_dim)
    attention_torch.rope_and_cache(
        qkv.float(), cos.float(), sin.float(), write, want_k, want_v, heads, kv_heads
    )
    torch.testing.assert_close(caches["n"][0].float(), want_k, **tol)
    torch.testing.assert_close(caches["n"][1].float(), want_v, atol=0, rtol=0)  # v is copied, not computed
    assert got_q.data_ptr() == qkv.data_ptr(), "q is rotated in place and returned as a view"


def test_rope_in_fp32_is_bit_identical_to_torch(native):
    qkv = torch.randn(5, 3 * 64)
    cos, sin = _rope_rows([0, 1, 100, 5000, 77], 64, torch.float32)
    write = torch.tensor([4, 0, 3, 1, 2])
    kt, vt = torch.zeros(1, 5, 64), torch.zeros(1, 5, 64)
    want = attention_torch.rope_and_cache(qkv.clone(), cos, sin, write, kt, vt, 1, 1)
    kn, vn = torch.zeros(1, 5, 64), torch.zeros(1, 5, 64)
    got = native.rope_and_cache(qkv, cos, sin, write, kn, vn, 1, 1)
    assert torch.equal(got, want) and torch.equal(kn, kt) and torch.equal(vn, vt)


def test_bad_inputs_raise_instead_of_reading_out_of_bounds(native):
    k_cache, v_cache = torch.zeros(2, 8, 16), torch.zeros(2, 8, 16)
    q = torch.zeros(2, 4, 16)
    index, lens, bias = _paged_batch([3, 2], 8, seed=1)
    with pytest.raises(ValueError, match="outside the 8 cache rows"):
        native.decode_attention(q, k_cache, v_cache, index + 6, lens, bias, 1.0)
    with pytest.raises(ValueError, match="kv_lens"):
        native.decode_attention(q, k_cache, v_cache, index, torch.tensor([4, 2]), bias, 1.0)
    with pytest.raises(ValueError, match="kv_lens"):
        native.decode_attention(q, k_cache, v_cache, index, torch.tensor([0, 2]), bias, 1.0)
    with pytest.raises(ValueError, match="grouping"):
        native.decode_attention(torch.zeros(2, 3, 16), k_cache, v_cache, index, lens, bias, 1.0)
    with pytest.raises(ValueError, match="dtypes"):
        native.decode_attention(q.half(), k_cache, v_cache, index, lens, bias, 1.0)
    qkv = torch.zeros(2, 8 * 16)
    cos = sin = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="write_index"):
        native.rope_and_cache(qkv, cos, sin, torch.tensor([1, 8]), k_cache, v_cache, 4, 2)
    with pytest.raises(ValueError, match="cos"):
        native.rope_and_cache(qkv, cos[:1], sin, torch.tensor([1, 2]), k_cache, v_cache, 4, 2)
    with pytest.raises(ValueError, match="qkv"):
        native.rope_and_cache(qkv[:, :-16], cos, sin, torch.tensor([1, 2]), k_cache, v_cache, 4, 2)


def test_long_context_scores_scratch_grows(native):
    lens = [3000, 1]
    rows = 3001
    k_cache = torch.randn(1, rows, 8)
    v_cache = torch.randn(1, rows, 8)
    index, kv_lens, bias = _paged_batch(lens, rows, seed=9)
    q = torch.randn(2, 2, 8)
    want = attention_torch.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 1 / math.sqrt(8))
    got = native.decode_attention(q, k_cache, v_cache, index, kv_lens, bias, 1 / math.sqrt(8))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
