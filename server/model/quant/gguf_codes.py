"""A GGUF file's own 4-bit blocks as ``Int4Codes``, exactly, keyed by the HF tensor names.

GGUF blocks hold 32 consecutive inputs of one output row (ggml's ``block_q4_1``: fp16 ``d``, fp16
``m``, 16 bytes of nibbles; the low nibbles are inputs 0-15, the high ones 16-31):

    Q4_1: w = d · q + m        Q4_0 (fp16 ``d``, 16 bytes): w = d · (q - 8) = d · q + (-8 d)

which is ``Int4Codes`` with groups of 32. llama.cpp stores q_proj and k_proj with their rows
permuted for its RoPE; the rows are put back the way transformers' GGUF loader does, so the codes
match the dense checkpoint ``loader.convert_gguf`` wrote. Other tensor types are left out (the
caller keeps those dense).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from server.model.quant.int_weights import Int4Codes

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def read_int4_codes(gguf_path: Path, num_heads: int, num_kv_heads: int) -> dict[str, Int4Codes]:
    """{HF name (``model.layers.{i}.self_attn.q_proj.weight``): codes} of every Q4_0/Q4_1 linear
    weight of the file; other types and tensors are not in the result."""
    from gguf import GGUFReader

    out: dict[str, Int4Codes] = {}
    for tensor in GGUFReader(gguf_path).tensors:
        match = _LAYER_TENSOR.fullmatch(tensor.name)
        kind = tensor.tensor_type.name
        if match is None or match[2] not in _NAMES or kind not in _BLOCK_BYTES:
            continue
        codes = _decode_blocks(np.asarray(tensor.data), kind)
        heads = {"attn_q": num_heads, "attn_k": num_kv_heads}.get(match[2])
        if heads is not None:
            codes = _unpermute_rows(codes, heads)
        out[f"model.layers.{match[1]}.{_NAMES[match[2]]}.weight"] = codes
    return out


def _decode_blocks(raw: np.ndarray, kind: str) -> Int4Codes:
    """raw [N, K/32 · block bytes] uint8 → codes [N, K], scale and minimum [N, K/32]."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[kind])  # [N, K/32, bytes]
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if kind == "Q4_1":
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[:, :, 4:20]
    else:
        m = -8 * d
        nibbles = blocks[:, :, 2:18]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2)  # [N, K/32, 32]: inputs 0-15, then 16-31
    return Int4Codes(
        torch.from_numpy(q.reshape(n, -1).astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(m)
    )


def _unpermute_rows(codes: Int4Codes, num_heads: int) -> Int4Codes:
    """Undo llama.cpp's q/k row order (transformers' ``_reverse_permute_weights``, on row indices)."""
    n = codes.codes.shape[0]
    rows = np.arange(n).reshape(num_heads, n // num_heads // 2, 2).swapaxes(2, 1).reshape(n)
    index = torch.from_numpy(rows)
    return Int4Codes(codes.codes[index], codes.scale[index], codes.minimum[index])
