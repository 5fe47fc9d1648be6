"""The embedded SmolLM2 GGUF's own Q4_1 blocks, read as int4 codes, are exactly its weights."""

from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import iter_safetensors, resolve_checkpoint
from server.model.quant import plan
from server.model.quant.gguf_codes import read_linears

pytestmark = pytest.mark.slow


def test_the_gguf_blocks_dequantize_to_the_converted_checkpoint_exactly():
    """Every Q4_1 linear weight (q and k with llama.cpp's RoPE row order undone) equals, bit for bit,
    the fp32 weight transformers' GGUF loader wrote into the converted checkpoint."""
    checkpoint = resolve_checkpoint(ModelConfig())
    assert checkpoint.gguf_path is not None and checkpoint.gguf_path.suffix == ".gguf"
    config = checkpoint.config
    linears = read_linears(checkpoint.gguf_path, config.num_attention_heads, config.num_key_value_heads)
    codes = linears.codes
    assert set(linears.types.values()) == {"Q4_1"}
    dense = {name: t for name, t in iter_safetensors(checkpoint.path) if plan.is_linear_weight(name)}
    assert sorted(codes) == sorted(dense) and len(codes) == 7 * config.num_hidden_layers
    for name, tensor in dense.items():
        assert torch.equal(codes[name].dequantize(), tensor), name
