"""A GGUF file's own 4-bit blocks as ``Int4Codes``, exactly, keyed by the HF tensor names.

Three of ggml's block types are group-wise int4 with a scale and a minimum per 32 consecutive
inputs of one output row, which is ``Int4Codes`` with groups of 32:

    Q4_0  blocks of 32: fp16 d, 16 bytes of nibbles          w = d · (q - 8) = d · q + (-8 d)
    Q4_1  blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles  w = d · q + m
    Q4_K  super-blocks of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scₛ, mₛ) for its 8 sub-blocks
          of 32, 128 bytes of nibbles                        w = (d · scₛ) · q + (-(dmin · mₛ))

(Q4_0/Q4_1 nibbles: the low ones are inputs 0-15, the high ones 16-31; Q4_K: each 32 bytes hold
two sub-blocks, the low nibbles the first.) Products and sums are those of gguf-py's
dequantization, which transformers' GGUF loader uses, so the codes give the converted checkpoint's
fp32 weights bit for bit. llama.cpp stores q_proj and k_proj with their rows permuted for its RoPE;
the rows are put back the way transformers' loader does. Other types (Q5_*, Q6_K, Q8_0, ...) have
no int4 kernel here: they are left out, and the caller keeps those weights dense or re-quantizes
them, as the scheme says.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.quant.int_weights import Int4Codes

GROUP = 32
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class GgufLinears:
    """The linear weights of a GGUF file: every one's ggml type, and codes for the 4-bit ones."""

    types: dict[str, str]  # HF name → ggml type name (Q4_K, Q6_K, ...)
    codes: dict[str, Int4Codes]  # HF name → codes, for the INT4_TYPES weights only

    def types_without_codes(self) -> Counter[str]:
        """{ggml type: how many linear weights} of the weights that have no int4 codes."""
        return Counter(kind for name, kind in self.types.items() if name not in self.codes)


def linear_types(gguf_path: Path) -> dict[str, str]:
    """{HF name (``model.layers.{i}.self_attn.q_proj.weight``): ggml type name} of the file's
    linear weights; reads the tensor index only."""
    from gguf import GGUFReader

    return {name: tensor.tensor_type.name for name, tensor in _linear_tensors(GGUFReader(gguf_path))}


def read_linears(gguf_path: Path, num_heads: int, num_kv_heads: int) -> GgufLinears:
    """The file's linear weights: types, and the codes of every Q4_0/Q4_1/Q4_K one."""
    from gguf import GGUFReader

    types: dict[str, str] = {}
    codes: dict[str, Int4Codes] = {}
    for name, tensor in _linear_tensors(GGUFReader(gguf_path)):
        kind = types[name] = tensor.tensor_type.name
        if kind not in INT4_TYPES:
            continue
        decoded = _decode_blocks(np.asarray(tensor.data), kind)
        heads = {"q_proj": num_heads, "k_proj": num_kv_heads}.get(name.split(".")[-2])
        codes[name] = _unpermute_rows(decoded, heads) if heads is not None else decoded
    return GgufLinears(types, codes)


def read_lm_head_q8_0(gguf_path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LM head's own Q8_0 blocks (``output.weight``, else the tied ``token_embd.weight``) as
    (int8 codes [V, hidden], fp32 scales [V, hidden / 32]), W = scale · code exactly as gguf-py
    dequantizes them; None when that tensor is stored in another type."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    tensor = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if tensor is None or tensor.tensor_type.name != "Q8_0":
        return None
    raw = np.asarray(tensor.data)  # [V, hidden/32 · 34] uint8: per block fp16 d, 32 int8 codes
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)
    scale = _fp16(blocks[:, :, 0:2])  # [V, hidden/32]
    codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, -1)  # [V, hidden]
    return torch.from_numpy(codes.copy()), torch.from_numpy(np.ascontiguousarray(scale))


def _linear_tensors(reader: Any) -> list[tuple[str, Any]]:
    """(HF name, GGUF tensor) of the layers' linear weights, in file order (gguf-py is untyped)."""
    out = []
    for tensor in reader.tensors:
        match = _LAYER_TENSOR.fullmatch(tensor.name)
        if match is not None and match[2] in _NAMES:
            out.append((f"model.layers.{match[1]}.{_NAMES[match[2]]}.weight", tensor))
    return out


def _decode_blocks(raw: np.ndarray, kind: str) -> Int4Codes:
    """raw [N, K/block · block bytes] uint8 → codes [N, K], scale and minimum [N, K/32]."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[kind])  # [N, blocks per row, bytes]
    if kind == "Q4_K":
        q, d, m = _q4_k_groups(blocks)
    else:
        d = _fp16(blocks[:, :, 0:2])  # [N, K/32]
        nibbles = blocks[:, :, 4:20] if kind == "Q4_1" else blocks[:, :, 2:18]  # [N, K/32, 16]
        m = _fp16(blocks[:, :, 2:4]) if kind == "Q4_1" else -8 * d
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2)  # [N, K/32, 32]: inputs 0-15, then 16-31
    return Int4Codes(
        torch.from_numpy(q.reshape(n, -1).astype(np.uint8)),
        torch.from_numpy(np.ascontiguousarray(d.reshape(n, -1))),
        torch.from_numpy(np.ascontiguousarray(m.reshape(n, -1))),
    )


def _q4_k_groups(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [N, S, 144] → codes [N, S, 8, 32], scale and minimum [N, S, 8] (fp32)."""
    from gguf.quants import Q4_K

    n, s, _ = blocks.shape
    flat = blocks.reshape(n * s, -1)
    d, dmin = _fp16(flat[:, 0:2])[:, None], _fp16(flat[:, 2:4])[:, None]  # [N·S, 1]
    sc, mins = Q4_K.get_scale_min(flat[:, 4:16])  # [N·S, 8] each, 6-bit
    qs = flat[:, 16:].reshape(n * s, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, s, 8, 32)  # sub-block 2i: low nibbles of bytes 32i..32i+31; 2i+1: high
    scale = (d * sc.astype(np.float32)).reshape(n, s, 8)
    minimum = -(dmin * mins.astype(np.float32)).reshape(n, s, 8)
    return q, scale, minimum


def _fp16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 little-endian halves → [...] fp32."""
    halves: np.ndarray = raw.copy().view(np.float16)[..., 0]
    return halves.astype(np.float32)


def _unpermute_rows(codes: Int4Codes, num_heads: int) -> Int4Codes:
    """Undo llama.cpp's q/k row order (transformers' ``_reverse_permute_weights``, on row indices)."""
    n = codes.codes.shape[0]
    rows = np.arange(n).reshape(num_heads, n // num_heads // 2, 2).swapaxes(2, 1).reshape(n)
    index = torch.from_numpy(rows)
    return Int4Codes(codes.codes[index], codes.scale[index], codes.minimum[index])
