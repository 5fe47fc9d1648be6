"""The Triton paged decode attention agrees with ``attention_torch.decode_attention``.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (small shapes); the tests
marked ``gpu`` run serving-sized shapes and a CUDA-graph replay where CUDA is available.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set before import

pytest.importorskip("triton")

from server.config import ModelConfig
from server.model.factory import pick_attention_ops
from server.ops import attention_torch, attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (rtol, atol)


def _paged_case(lens, num_heads, num_kv_heads, head_dim, rows, seed=0):
    """(q, k_cache, v_cache, kv_index, kv_lens, kv_bias): each sequence's rows scattered over a
    cache with unrelated rows in between (real paging); padding entries of kv_index point at rows
    that hold NaN, which the kernel must never read (it stops at kv_lens)."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, max_len = len(lens), max(lens)
    k_cache = torch.randn(num_kv_heads, rows, head_dim, generator=gen)  # [H_kv, rows, D]
    v_cache = torch.randn(num_kv_heads, rows, head_dim, generator=gen)
    perm = torch.randperm(rows, generator=gen)
    used, poisoned = perm[: sum(lens)], perm[sum(lens) :]
    k_cache[:, poisoned], v_cache[:, poisoned] = float("nan"), float("nan")
    kv_index = poisoned[torch.randint(len(poisoned), (num_seqs, max_len), generator=gen)]  # [Bd, Lmax]
    for seq, rows_of_seq in enumerate(used.split(list(lens))):
        kv_index[seq, : len(rows_of_seq)] = rows_of_seq
    kv_lens = torch.tensor(lens, dtype=torch.int64)  # [Bd]
    positions = torch.arange(max_len)[None, :]
    kv_bias = torch.where(positions < kv_lens[:, None], 0.0, float("-inf")).view(num_seqs, 1, 1, max_len)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen)  # [Bd, H, D]
    return q, k_cache, v_cache, kv_index, kv_lens, kv_bias


def _expected(q, k_cache, v_cache, kv_index, kv_lens, kv_bias, scale):
    """The torch reference in fp32 on the same (rounded) values; NaN rows, never attended, as 0."""
    k_clean, v_clean = (torch.nan_to_num(c.float(), nan=0.0) for c in (k_cache, v_cache))
    return attention_torch.decode_attention(q.float(), k_clean, v_clean, kv_index, kv_lens, kv_bias, scale)


def _check(case, dtype, device=DEVICE, **kwargs):
    q, k_cache, v_cache, kv_index, kv_lens, kv_bias = case
    q, k_cache, v_cache = (t.to(dtype) for t in (q, k_cache, v_cache))
    scale = q.shape[-1] ** -0.5
    expected = _expected(q, k_cache, v_cache, kv_index, kv_lens, kv_bias, scale)
    args = [t.to(device) for t in (q, k_cache, v_cache, kv_index, kv_lens, kv_bias)]
    got = attention_triton.decode_attention(*args, scale, **kwargs)
    assert got.dtype == dtype and got.shape == q.shape and got.device.type == device.type
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float().cpu(), expected, rtol=rtol, atol=atol)
    return got


# ragged lengths: 1, inside one block of 32, several blocks, a partial last block
LENS = [1, 9, 70, 33]


@pytest.mark.parametrize("partition_rows", [512, 32], ids=["one-partition", "split"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])
def test_matches_reference_on_a_paged_cache(dtype, heads, partition_rows):
    case = _paged_case(LENS, *heads, head_dim=16, rows=240)
    got = _check(case, dtype, partition_rows=partition_rows)
    assert torch.isfinite(got).all(), "a NaN row past some sequence's length was read"


def test_head_dim_below_block_and_wide_groups():
    """D=24 (masked to a block of 32) and 8 query heads per kv head."""
    _check(_paged_case([5, 40], 8, 1, head_dim=24, rows=100, seed=1), torch.float32)


def test_non_contiguous_q_rows():
    """q as the fused projection's view (row stride (H + 2·H_kv)·D), and with a non-unit D stride."""
    q, *rest = _paged_case(LENS, 4, 2, head_dim=16, rows=240, seed=2)
    qkv = torch.randn(len(LENS), (4 + 2 * 2) * 16)
    qkv[:, : 4 * 16] = q.reshape(len(LENS), -1)
    view = qkv[:, : 4 * 16].view(len(LENS), 4, 16)  # [Bd, H, D], row stride 128
    assert not view.is_contiguous()
    for dtype in TOLERANCES:
        _check((view, *rest), dtype, partition_rows=32)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)  # [Bd, H, D], stride(2) = H
    _check((transposed, *rest), torch.float32)


def test_q_in_another_dtype_than_the_cache():
    q, k_cache, v_cache, kv_index, kv_lens, kv_bias = _paged_case([3, 50], 4, 2, head_dim=16, rows=80, seed=3)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    args = [t.to(DEVICE) for t in (q, k_cache, v_cache, kv_index, kv_lens, kv_bias)]
    got = attention_triton.decode_attention(*args, 0.25)
    expected = _expected(q.bfloat16(), k_cache, v_cache, kv_index, kv_lens, kv_bias, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-2, atol=2e-2)


def test_a_zero_length_slot_gives_zeros_and_leaves_the_others_alone():
    """A padded CUDA-graph slot (kv_lens 0) is defined: zeros, in both the one- and split paths."""
    q, k_cache, v_cache, kv_index, kv_lens, kv_bias = _paged_case([1, 40], 4, 2, head_dim=16, rows=80, seed=4)
    expected = _expected(q, k_cache, v_cache, kv_index, kv_lens, kv_bias, 0.25)
    padded_lens = torch.tensor([1, 40, 0])
    padded_index = torch.cat([kv_index, kv_index[:1]])
    q_padded = torch.cat([q, torch.randn(1, 4, 16)])
    args = [t.to(DEVICE) for t in (q_padded, k_cache, v_cache, padded_index, padded_lens)]
    for partition_rows in (512, 32):
        got = attention_triton.decode_attention(*args, kv_bias, 0.25, partition_rows=partition_rows).cpu()
        torch.testing.assert_close(got[:2], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2], torch.zeros(4, 16))


def _rope_case(num_tokens, num_heads, num_kv_heads, head_dim, rows, dtype, seed=0):
    """(qkv as a view with a wider row stride, cos, sin, write_index scattered over the cache, caches)."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width + 8, generator=gen)[:, 3 : 3 + width].to(dtype)  # [T, width]
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 100
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(dtype) for f in (torch.cos, torch.sin))  # [T, D]
    write_index = torch.randperm(rows, generator=gen)[:num_tokens]  # [T]
    k_cache = torch.randn(num_kv_heads, rows, head_dim, generator=gen).to(dtype)  # [H_kv, rows, D]
    v_cache = torch.randn(num_kv_heads, rows, head_dim, generator=gen).to(dtype)
    return qkv, cos, sin, write_index, k_cache, v_cache


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])
def test_rope_and_cache_matches_reference(dtype, heads):
    qkv, cos, sin, write_index, k_cache, v_cache = _rope_case(7, *heads, head_dim=24, rows=40, dtype=dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    q_expected = attention_torch.rope_and_cache(qkv, cos, sin, write_index, k_expected, v_expected, *heads)
    qkv_dev, k_got, v_got = (t.to(DEVICE).clone() for t in (qkv, k_cache, v_cache))
    others = [t.to(DEVICE) for t in (cos, sin, write_index)]
    q_got = attention_triton.rope_and_cache(qkv_dev, *others, k_got, v_got, *heads)
    assert q_got.shape == q_expected.shape and q_got.data_ptr() == qkv_dev.data_ptr(), "q: rotated in place"
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(q_got.cpu(), q_expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(k_got.cpu(), k_expected, rtol=rtol, atol=atol)
    assert torch.equal(v_got.cpu(), v_expected), "v is copied as is"
    untouched = torch.ones(k_cache.shape[1], dtype=torch.bool)
    untouched[write_index] = False
    assert torch.equal(k_got.cpu()[:, untouched], k_cache[:, untouched]), "only the write_index rows change"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "qkv": a["qkv"][:, :-2]}, "qkv must be"),
        (lambda a: {**a, "cos": a["cos"][:-1]}, "cos and sin"),
        (lambda a: {**a, "write_index": a["write_index"].int()}, "write_index must be"),
        (lambda a: {**a, "num_kv_heads": 1}, "k_cache and v_cache"),
    ],
)
def test_bad_rope_inputs_name_what_is_wrong(change, message):
    names = ("qkv", "cos", "sin", "write_index", "k_cache", "v_cache")
    args = dict(zip(names, _rope_case(3, 4, 2, head_dim=16, rows=10, dtype=torch.float32), strict=True))
    with pytest.raises(ValueError, match=message):
        attention_triton.rope_and_cache(**change({**args, "num_heads": 4, "num_kv_heads": 2}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "k_cache": a["k_cache"][:1]}, "k_cache and v_cache"),
        (lambda a: {**a, "q": a["q"][:, :3]}, "head grouping"),
        (lambda a: {**a, "kv_index": a["kv_index"].int()}, "kv_index must be int64"),
        (lambda a: {**a, "kv_lens": a["kv_lens"][:1]}, "kv_lens must be"),
        (lambda a: {**a, "q": a["q"].long()}, "q must be float"),
        (lambda a: {**a, "kv_index": a["kv_index"].t().contiguous().t()}, "unit innermost stride"),
    ],
)
def test_bad_inputs_name_what_is_wrong(change, message):
    names = ("q", "k_cache", "v_cache", "kv_index", "kv_lens", "kv_bias")
    args = dict(zip(names, _paged_case([2, 3], 4, 2, head_dim=16, rows=20), strict=True))
    with pytest.raises(ValueError, match=message):
        attention_triton.decode_attention(**change(args), scale=0.25)


def test_factory_picks_triton_on_cuda_and_keeps_cpu_untouched(caplog):
    config = ModelConfig()
    with caplog.at_level(logging.INFO, logger="server.model.factory"):
        assert pick_attention_ops(None, config, torch.device("cuda")) is attention_triton
    assert "Triton paged kernel" in caplog.text
    assert pick_attention_ops(None, config, torch.device("cpu")) is None  # attention_torch


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])
def test_serving_shapes_on_cuda(dtype):
    """Llama-8B-like heads (32 query, 8 kv, D=128), contexts up to 3000 positions (split)."""
    case = _paged_case([1, 17, 700, 3000, 128], 32, 8, head_dim=128, rows=8000, seed=5)
    _check(case, dtype, device=torch.device("cuda"))


@pytest.mark.gpu
@CUDA
def test_cuda_graph_replay_follows_new_lengths_and_rows():
    """Captured once, replayed after kv_index / kv_lens change in place: no host sync inside."""
    cuda = torch.device("cuda")
    first = [t.to(cuda) for t in _paged_case([5, 900, 64], 8, 2, head_dim=64, rows=3000, seed=6)]
    second = _paged_case([1, 300, 2000], 8, 2, head_dim=64, rows=3000, seed=7)
    q, k_cache, v_cache, kv_index, kv_lens, kv_bias = first
    static_index = torch.zeros(3, 2000, dtype=torch.int64, device=cuda)
    static_index[:, : kv_index.shape[1]] = kv_index
    attention_triton.decode_attention(q, k_cache, v_cache, static_index, kv_lens, kv_bias, 0.125)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton.decode_attention(q, k_cache, v_cache, static_index, kv_lens, kv_bias, 0.125)
    for tensor, new in zip((q, k_cache, v_cache, static_index, kv_lens), second, strict=False):
        tensor.copy_(new)
    graph.replay()
    expected = _expected(*second[:5], second[5], 0.125)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
