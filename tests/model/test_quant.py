"""Quantized base weights (server/model/quant/): codes, kernels, the model, adapters over them.

The reference of a quantized model is the dense model whose weights are the dequantized codes:
with fp32 activations the int kernels agree with it to float rounding; with bf16 activations (what
serving uses) to bf16 rounding. Adapters run over a quantized base exactly as over a dense one.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.model.factory import load_model
from server.model.lora_linear import MultiLoRALinear
from server.model.quant import plan
from server.model.quant.int_weights import (
    Int4Codes,
    Int4Weight,
    Int8Weight,
    concat,
    quantize_int4,
    quantize_int8,
)
from server.ops.lora_torch import LoRASegments
from tests.engine.test_engine_parity import our_last_logits, save_peft_adapter

GEN = torch.Generator().manual_seed(0)


def _weight(n: int = 96, k: int = 64) -> torch.Tensor:
    return torch.randn(n, k, generator=GEN) * 0.05


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_int8])
def test_codes_round_trip_within_half_a_step(quantize):
    w = _weight()
    codes = quantize(w)
    step = codes.scale if isinstance(codes, Int4Codes) else codes.scale[:, None]
    error = (codes.dequantize() - w).abs()
    if isinstance(codes, Int4Codes):
        assert codes.codes.max() <= 15 and codes.scale.shape == (96, 2)
        step = codes.scale.repeat_interleave(32, dim=1)
    assert bool((error <= step / 2 + 1e-6).all())


@pytest.mark.parametrize(("quantize", "kind"), [(quantize_int4, Int4Weight), (quantize_int8, Int8Weight)])
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
def test_the_kernels_multiply_by_the_dequantized_weight(quantize, kind, activations):
    codes = quantize(_weight())
    x = torch.randn(5, 64, generator=GEN)
    y = kind(codes, activations).matmul(x)
    expected = x @ codes.dequantize().T
    tolerance = 1e-5 if activations == torch.float32 else 2e-2
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)


def test_fused_projections_concatenate_along_the_outputs():
    parts = [quantize_int4(_weight(n)) for n in (64, 16, 16)]
    fused = concat(parts)
    assert isinstance(fused, Int4Codes)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    with pytest.raises(ValueError, match="stored differently"):
        concat([parts[0], quantize_int8(_weight())])


def test_a_lora_side_path_over_an_int4_base_equals_it_over_the_dense_one():
    names, sizes = ("q_proj", "k_proj", "v_proj"), (64, 16, 16)
    parts = [quantize_int4(_weight(n)) for n in sizes]
    common = dict(slice_names=names, slice_sizes=sizes, max_loras=2, max_lora_rank=8, target_names=names)
    quantized = MultiLoRALinear(concat(parts), None, lora_dtype=torch.float32, activation_dtype=torch.float32,
                                **common)  # fmt: skip
    dense = MultiLoRALinear(torch.cat([p.dequantize() for p in parts]), None, **common)
    adapter = {
        n: (torch.randn(8, 64, generator=GEN), torch.randn(s, 8, generator=GEN))
        for n, s in zip(names, sizes, strict=True)
    }
    for layer in (quantized, dense):
        layer.set_slot(1, adapter, scale=0.5)
    segments = LoRASegments.build([-1, 1, 1, 1], torch.device("cpu"), [0, 8])
    x = torch.randn(4, 64, generator=GEN)
    torch.testing.assert_close(quantized(x, segments), dense(x, segments), rtol=1e-5, atol=1e-5)
    assert quantized.weight.numel() == 0 and quantized.quantized is not None  # no dense copy kept


def test_a_quantized_weight_needs_the_side_paths_dtype():
    with pytest.raises(ValueError, match="lora_dtype"):
        MultiLoRALinear(quantize_int4(_weight()), None, ("o_proj",), (96,), 1, 4, ("o_proj",))


def test_schemes_are_checked_at_start():
    with pytest.raises(
        ValueError, match="quantization must be one of auto, none, int4, int8, nf4, got 'fp3'"
    ):
        ModelConfig(quantization="fp3")
    with pytest.raises(ValueError, match="--quantization int4 runs on CPU only"):
        plan.check_device("int4", torch.device("cuda"))
    plan.check_device("none", torch.device("cuda"))


def _dequantized_copy(model_dir, out_dir):
    """The checkpoint with every linear weight replaced by its int4 codes, dequantized: the dense twin."""
    shutil.copytree(model_dir, out_dir)
    (path,) = out_dir.glob("*.safetensors")
    tensors = load_file(path)
    twin = {n: quantize_int4(t).dequantize() if plan.is_linear_weight(n) else t for n, t in tensors.items()}
    save_file(twin, path, metadata={"format": "pt"})
    return out_dir


def _core(model_dir, quantization: str) -> EngineCore:
    config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=64)
    model_config = ModelConfig(model=str(model_dir), dtype="float32", device="cpu", quantization=quantization)
    return EngineCore(load_model(model_config, config), config)


def test_an_int4_model_serves_an_adapter_like_its_dense_twin(tiny_llama_dir, tmp_path):
    """Logits of a prefill, base and with a peft adapter: int4 (bf16 GEMM activations) against the
    dense model of the same dequantized weights; the quantized model keeps 4-bit codes only."""
    twin_dir = _dequantized_copy(tiny_llama_dir, tmp_path / "twin")
    adapter = save_peft_adapter(tiny_llama_dir, tmp_path / "lora", seed=1, r=8, lora_alpha=16,
                                target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    cores = {"int4": _core(tiny_llama_dir, "int4"), "dense": _core(twin_dir, "none")}
    prompt = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
    for core in cores.values():
        core.add_adapter("a", adapter)
    for adapter_id in (None, "a"):
        got, expected = (our_last_logits(core, prompt, adapter_id) for core in cores.values())
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() < 0.02 * scale
    base, with_adapter = (our_last_logits(cores["int4"], prompt, a) for a in (None, "a"))
    assert (base - with_adapter).abs().max().item() > 0.05 * base.abs().max().item()  # the adapter matters
    modules = [m for _, m in cores["int4"].loaded.model.lora_layers()]
    assert modules and all(m.quantized is not None and m.quantized.scheme == "int4" for m in modules)


def test_no_merged_copy_is_made_over_a_quantized_base(tiny_llama_dir, tmp_path):
    core = _core(tiny_llama_dir, "int8")
    core.add_adapter(
        "a", save_peft_adapter(tiny_llama_dir, tmp_path / "lora", seed=2, r=4, target_modules=["q_proj"])
    )
    core.adapters.prefetch("a")
    with pytest.raises(ValueError, match=r"the base model is quantized \(int8\): merged copies are not made"):
        core.merges.merge("a")
    assert not core.merges.config.enabled


def test_long_calls_unpack_the_int4_codes_and_agree_with_the_kernel():
    codes = quantize_int4(torch.randn(128, 64, generator=GEN))  # 128 outputs: whole blocks of 64
    weight = Int4Weight(codes, torch.float32)
    assert weight.can_unpack
    torch.testing.assert_close(weight.dequantize(), codes.dequantize(), rtol=1e-6, atol=1e-6)
    x = torch.randn(6, 64, generator=GEN)
    kernel = weight.matmul(x)
    weight.dequantize_min_rows = 6
    torch.testing.assert_close(weight.matmul(x), kernel, rtol=1e-5, atol=1e-5)
    odd_codes = quantize_int4(_weight(80))  # not whole blocks of 64 or 32 outputs: the kernel only
    odd = Int4Weight(odd_codes, torch.float32)
    odd.dequantize_min_rows = 1
    assert not odd.can_unpack
    torch.testing.assert_close(odd.matmul(x), x @ odd_codes.dequantize().T, rtol=1e-5, atol=1e-5)


def test_nf4_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    from server.model.quant.nf4 import quantize_nf4

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(
        ValueError, match=r"--quantization nf4 needs bitsandbytes: pip install 'loraplex\[quant\]'"
    ):
        quantize_nf4(_weight())
