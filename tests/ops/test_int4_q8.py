"""The int4 x int8-activation kernel (server/ops/int4_q8.c) against the same products in torch.

Its reference quantizes each group of 32 activations of a row as the kernel does (scale
``max|x| / 127``, codes rounded to nearest even) and sums ``scale_w · scale_x · Σ q · xq`` plus
``minimum · scale_x · Σ xq`` over the groups in fp64: the kernel must match it to fp32 rounding.
Against the dense fp32 product of the dequantized weight it is off by the activations' int8
rounding only (half a step of each group's int8 scale per input, at most). Runs where the CPU has
AVX2 and FMA; elsewhere ``load()`` is None and only that is checked.
"""

from __future__ import annotations

import pytest
import torch

from server.model.quant.int_weights import Int4Weight, Int8LMHead, quantize_int4
from server.ops import int4_q8
from server.ops.cpu_info import cpuinfo_flags_line
from server.ops.lora_torch import LoRASegments
from tests.ops.test_int4_amx import qkv_layers_with_an_adapter

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    kernel = int4_q8.load(tmp_path_factory.mktemp("kernels"))
    if kernel is None:
        flags = cpuinfo_flags_line().split()
        assert not ("avx2" in flags and "fma" in flags), "an AVX2 + FMA CPU, and the kernel did not load"
        pytest.skip("this CPU has no AVX2 and FMA")
    return kernel


def _codes(n: int, k: int):
    return quantize_int4(torch.randn(n, k, generator=GEN) * 0.05)


def _reference(x: torch.Tensor, codes) -> torch.Tensor:
    """fp32 [M, N]: the kernel's arithmetic (int8 activations per group of 32) in fp64."""
    m, k = x.shape
    groups = x.float().view(m, k // 32, 32)
    max_abs = groups.abs().amax(dim=2, keepdim=True)
    inverse = torch.where(max_abs > 0, 127.0 / max_abs, torch.zeros_like(max_abs))
    xq = torch.round(groups * inverse).double()  # [M, G, 32], as the kernel rounds in fp32
    dx = (max_abs / 127.0).double()[..., 0]  # [M, G]
    q = codes.codes.view(codes.codes.shape[0], k // 32, 32).double()  # [N, G, 32]
    integer = torch.einsum("mgk,ngk->mng", xq, q)  # [M, N, G]
    scaled = (integer * dx[:, None, :] * codes.scale.double()[None]).sum(dim=2)
    minimums = (xq.sum(dim=2) * dx) @ codes.minimum.double().T  # [M, N]: the quantized activations' sums
    return (scaled + minimums).float()


def _dense(x: torch.Tensor, codes) -> torch.Tensor:
    return x.float() @ codes.dequantize().T


def _rounding_bound(x: torch.Tensor, codes) -> torch.Tensor:
    """[M, N]: the most the activations' int8 rounding can move an output: half a step of each
    group's scale per input, times the weight's magnitude there."""
    m, k = x.shape
    half_step = x.float().view(m, k // 32, 32).abs().amax(dim=2) / 254  # [M, G]
    weight_mass = codes.dequantize().abs().view(-1, k // 32, 32).sum(dim=2)  # [N, G]
    return half_step @ weight_mass.T


@pytest.mark.parametrize(("n", "k"), [(8, 32), (24, 64), (96, 576), (584, 1536)])  # blocks of 8 outputs
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 33])  # whole and partial tiles of 4 rows
def test_the_kernel_computes_int4_times_int8_groups(q8, n, k, rows):
    codes = _codes(n, k)
    packed = int4_q8.pack(codes.codes, codes.scale, codes.minimum)
    x = torch.randn(rows, k, generator=GEN)
    got = q8.matmul(x, packed, torch.float32)
    expected = _reference(x, codes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    off = (got - _dense(x, codes)).abs()
    assert (off <= _rounding_bound(x, codes) * 1.001 + 1e-5).all()  # the activations' int8 rounding


def test_bf16_activations_and_outputs_and_strided_rows(q8):
    codes = _codes(64, 128)
    packed = int4_q8.pack(codes.codes, codes.scale, codes.minimum)
    wide = torch.randn(6, 256, generator=GEN)
    view = wide[:, 64:192]  # rows 256 apart: the kernel reads them with the row stride
    torch.testing.assert_close(q8.matmul(view, packed, torch.float32), _reference(view, codes))
    bf16 = view.to(torch.bfloat16)
    expected = _reference(bf16, codes)
    got = q8.matmul(bf16, packed, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())
    assert torch.equal(got, q8.matmul(bf16, packed, torch.float32).to(torch.bfloat16))  # rounded once


def test_zero_rows_and_groups_of_zeros(q8):
    codes = _codes(16, 64)
    packed = int4_q8.pack(codes.codes, codes.scale, codes.minimum)
    assert q8.matmul(torch.empty(0, 64), packed, torch.float32).shape == (0, 16)
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.randn(32, generator=GEN)  # row 0 all zeros, row 1's first group zeros
    got = q8.matmul(x, packed, torch.float32)
    assert torch.equal(got[0], torch.zeros(16))
    torch.testing.assert_close(got, _reference(x, codes))


def test_bad_inputs_are_refused(q8):
    codes = _codes(32, 64)
    packed = int4_q8.pack(codes.codes, codes.scale, codes.minimum)
    with pytest.raises(ValueError, match=r"packed weights must be \[N/8, 1, 192\] uint8"):
        q8.matmul(torch.randn(2, 32), packed, torch.float32)
    with pytest.raises(ValueError, match=r"output dtype torch\.float16 unsupported"):
        q8.matmul(torch.randn(2, 64), packed, torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        q8.matmul(torch.randn(2, 64), packed[:, :, :191], torch.float32)
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        q8.matmul(torch.randn(64), packed, torch.float32)
    with pytest.raises(ValueError, match="blocks of 8 outputs, 32 inputs"):
        int4_q8.pack(torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1))
    with pytest.raises(ValueError, match="blocks of 8 outputs, 32 inputs"):
        int4_q8.pack(torch.zeros(7, 64, dtype=torch.uint8), torch.ones(7, 2), torch.zeros(7, 2))
    assert not int4_q8.fits(7, 64) and int4_q8.fits(8, 64)  # a weight that does not fit keeps torch's kernel


def test_an_int4_weight_takes_the_kernel_from_its_min_rows_on(q8):
    codes = _codes(128, 64)
    weight, plain = Int4Weight(codes, torch.bfloat16, q8), Int4Weight(codes, torch.bfloat16)
    assert weight.native_packed is not None and plain.native_packed is None
    q8.min_rows = 4
    try:
        few, many = (torch.randn(r, 64, generator=GEN) for r in (3, 8))
        assert torch.equal(weight.matmul(few), plain.matmul(few))  # under min_rows: torch's kernel
        on_q8 = weight.matmul(many)
        assert on_q8.dtype == torch.float32  # fp32 activations stay fp32 on this kernel
        torch.testing.assert_close(on_q8, _reference(many, codes))
    finally:
        q8.min_rows = 1


def test_a_side_path_over_a_q8_base_adds_to_it_as_over_the_dense_one(q8):
    quantized, dense = qkv_layers_with_an_adapter(q8, _codes, torch.float32, GEN)
    segments = LoRASegments.build([-1, 1, 1, 1, -1], torch.device("cpu"), [0, 8])
    x = torch.randn(5, 64, generator=GEN)
    got, expected = quantized(x, segments), dense(x, segments)
    assert got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() < 0.03
    base_only = quantized(x, LoRASegments.build([-1] * 5, torch.device("cpu"), [0]))
    torch.testing.assert_close(got[0], base_only[0])
    lora = dense(x, segments) - dense(x, LoRASegments.build([-1] * 5, torch.device("cpu"), [0]))
    torch.testing.assert_close(got - base_only, lora, rtol=1e-4, atol=1e-4)  # the side path, exactly


def _int8_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N]: int8 weights times the activations quantized per group of 32, in fp64."""
    m, k = x.shape
    groups = x.float().view(m, k // 32, 32)
    max_abs = groups.abs().amax(dim=2, keepdim=True)
    inverse = torch.where(max_abs > 0, 127.0 / max_abs, torch.zeros_like(max_abs))
    xq, dx = torch.round(groups * inverse).double(), (max_abs / 127.0).double()[..., 0]
    q = codes.view(codes.shape[0], k // 32, 32).double()
    return (torch.einsum("mgk,ngk->mng", xq, q) * dx[:, None, :] * scale.double()[None]).sum(dim=2).float()


@pytest.mark.parametrize(("n", "k"), [(8, 32), (24, 64), (584, 576)])
@pytest.mark.parametrize("rows", [1, 4, 5, 9])
def test_int8_weights_times_int8_groups(q8, n, k, rows):
    """GGUF's Q8_0 blocks (int8 codes, a scale per 32): codes of both signs, -127 and 127 included."""
    codes = torch.randint(-127, 128, (n, k), generator=GEN, dtype=torch.int8)
    codes[0, :2] = torch.tensor([-127, 127], dtype=torch.int8)
    scale = torch.rand(n, k // 32, generator=GEN) * 0.01
    packed = int4_q8.pack_int8(codes, scale)
    x = torch.randn(rows, k, generator=GEN)
    got = q8.matmul_int8(x, packed, torch.float32)
    expected = _int8_reference(x, codes, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with pytest.raises(ValueError, match=r"packed weights must be \[N/8, \d+, 192\] uint8"):
        q8.matmul(x, packed, torch.float32)  # int8 records are not int4 ones
    with pytest.raises(ValueError, match="need int8, blocks of 8 outputs and 32 inputs"):
        int4_q8.pack_int8(codes[:7], scale[:7])


def test_an_int8_lm_head_serves_up_to_its_max_rows(q8):
    codes = torch.randint(-127, 128, (96, 64), generator=GEN, dtype=torch.int8)
    scale = torch.rand(96, 2, generator=GEN) * 0.01
    head = Int8LMHead(q8, codes, scale, max_rows=4)
    x = torch.randn(4, 64, generator=GEN)
    torch.testing.assert_close(head.matmul(x), _int8_reference(x, codes, scale))
    assert head.matmul(torch.randn(5, 64, generator=GEN)) is None  # the caller's dense head
    assert head.num_bytes == 96 * (64 + 2 * 4)
