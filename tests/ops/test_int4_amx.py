"""The AMX int4 kernel (server/ops/int4_amx.c) against the dense bf16 GEMM of the same weights.

Its reference is ``x · bf16(scale · q + minimum)ᵀ`` in fp32: each weight dequantized in fp32 and
rounded once to bf16, the products accumulated in fp32. Runs where the CPU has AMX-BF16 (Intel
Sapphire Rapids and later); elsewhere ``load()`` is None and only that is checked.
"""

from __future__ import annotations

import pytest
import torch

from server.model.lora_linear import MultiLoRALinear
from server.model.quant.int_weights import Int4Weight, concat, quantize_int4
from server.ops import int4_amx
from server.ops.cpu_info import cpuinfo_flags_line
from server.ops.lora_torch import LoRASegments

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def amx(tmp_path_factory):
    kernel = int4_amx.load(tmp_path_factory.mktemp("kernels"))
    if kernel is None:
        assert "amx_bf16" not in cpuinfo_flags_line(), "an AMX-BF16 CPU, and the kernel did not load"
        pytest.skip("this CPU has no AMX-BF16")
    return kernel


def _codes(n: int, k: int):
    return quantize_int4(torch.randn(n, k, generator=GEN) * 0.05)


def _reference(x: torch.Tensor, codes) -> torch.Tensor:
    """fp32 [M, N]: x (bf16) times the weights rounded once to bf16, accumulated in fp32."""
    n, k = codes.codes.shape
    weight = torch.addcmul(
        codes.minimum[..., None], codes.codes.view(n, -1, 32).float(), codes.scale[..., None]
    )
    return x.float() @ weight.view(n, k).to(torch.bfloat16).float().T


@pytest.mark.parametrize(("n", "k"), [(48, 64), (96, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 70])  # partial row tiles, and more than one pass of 64
def test_the_kernel_multiplies_by_the_bf16_dequantized_weight(amx, n, k, rows):
    codes = _codes(n, k)
    packed = int4_amx.pack(codes.codes, codes.scale, codes.minimum)
    x = torch.randn(rows, k, generator=GEN).to(torch.bfloat16)
    expected = _reference(x, codes)
    got = amx.matmul(x, packed, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(amx.matmul(x, packed, torch.bfloat16), got.to(torch.bfloat16))  # rounded once


def test_strided_and_fp32_activations(amx):
    codes = _codes(64, 128)
    packed = int4_amx.pack(codes.codes, codes.scale, codes.minimum)
    wide = torch.randn(8, 256, generator=GEN).to(torch.bfloat16)
    view = wide[:, 64:192]  # rows 256 apart: the kernel reads them with the row stride
    torch.testing.assert_close(
        amx.matmul(view, packed, torch.float32), _reference(view, codes), rtol=1e-4, atol=1e-4
    )
    fp32 = torch.randn(3, 128, generator=GEN)  # cast to bf16 first, as the serving activations are
    torch.testing.assert_close(
        amx.matmul(fp32, packed, torch.float32),
        _reference(fp32.to(torch.bfloat16), codes),
        rtol=1e-4,
        atol=1e-4,
    )


def test_bad_inputs_are_refused(amx):
    codes = _codes(32, 64)
    packed = int4_amx.pack(codes.codes, codes.scale, codes.minimum)
    with pytest.raises(ValueError, match="x has 32 inputs, the weight 64"):
        amx.matmul(torch.randn(2, 32).to(torch.bfloat16), packed, torch.float32)
    with pytest.raises(ValueError, match=r"output dtype torch\.float16 unsupported"):
        amx.matmul(torch.randn(2, 64).to(torch.bfloat16), packed, torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        amx.matmul(torch.randn(2, 64).to(torch.bfloat16), packed[:, :1], torch.float32)
    with pytest.raises(ValueError, match="blocks of 16 outputs"):
        int4_amx.pack(*(getattr(_codes(24, 64), f) for f in ("codes", "scale", "minimum")))


def test_an_int4_weight_takes_the_amx_kernel_from_its_min_rows_on(amx):
    codes = _codes(128, 64)
    weight, plain = Int4Weight(codes, torch.bfloat16, amx), Int4Weight(codes, torch.bfloat16)
    assert weight.native_packed is not None and plain.native_packed is None
    amx.min_rows = 4
    few, many = (torch.randn(r, 64, generator=GEN).to(torch.bfloat16) for r in (3, 8))
    assert torch.equal(weight.matmul(few), plain.matmul(few))  # under min_rows: torch's kernel
    on_amx = weight.matmul(many)
    assert on_amx.dtype == torch.bfloat16
    expected = _reference(many, codes)
    torch.testing.assert_close(on_amx.float(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())
    torch.testing.assert_close(on_amx.float(), plain.matmul(many).float(), rtol=2e-2, atol=2e-2)


def qkv_layers_with_an_adapter(kernel, codes_of, dense_dtype: torch.dtype, generator: torch.Generator):
    """A fused q|k|v layer (64 inputs) over ``kernel``'s int4 base and the same layer dense in
    ``dense_dtype``, both with one random rank-8 adapter in slot 1 (scale 0.5)."""
    names, sizes = ("q_proj", "k_proj", "v_proj"), (64, 16, 16)
    parts = [codes_of(s, 64) for s in sizes]
    common = dict(slice_names=names, slice_sizes=sizes, max_loras=2, max_lora_rank=8, target_names=names)
    quantized = MultiLoRALinear(concat(parts), None, lora_dtype=torch.float32, int4_native=kernel, **common)
    dense = MultiLoRALinear(torch.cat([p.dequantize() for p in parts]).to(dense_dtype), None,
                            lora_dtype=torch.float32, **common)  # fmt: skip
    adapter = {
        n: (torch.randn(8, 64, generator=generator), torch.randn(s, 8, generator=generator))
        for n, s in zip(names, sizes, strict=True)
    }
    for layer in (quantized, dense):
        layer.set_slot(1, adapter, scale=0.5)
    return quantized, dense


def test_a_side_path_over_an_amx_base_adds_to_it_as_over_the_dense_one(amx):
    amx.min_rows = 1
    quantized, dense = qkv_layers_with_an_adapter(amx, _codes, torch.bfloat16, GEN)
    segments = LoRASegments.build([-1, 1, 1, 1, -1], torch.device("cpu"), [0, 8])
    x = torch.randn(5, 64, generator=GEN).to(torch.bfloat16)
    got, expected = quantized(x, segments), dense(x, segments)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(got[1], quantized(x, LoRASegments.build([-1] * 5, torch.device("cpu"), [0]))[1])
