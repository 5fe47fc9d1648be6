"""bitsandbytes NF4 base weights (the format QLoRA trains on), through bitsandbytes itself.

``quantize_nf4`` is ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``,
what transformers runs for ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``,
so an adapter trained with peft on that base sees the same weights here: 4-bit indices into the
NF4 codebook, one fp32 absmax per block of 64 consecutive weights (row-major). The GEMM is
``bitsandbytes.matmul_4bit`` (CPU and CUDA). bitsandbytes is the ``quant`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NF4_BLOCK = 64  # weights per absmax block (transformers' default for 4-bit loading)


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(
            "--quantization nf4 needs bitsandbytes: pip install 'loraplex[quant]' (or bitsandbytes>=0.46)"
        ) from None
    return bitsandbytes


@dataclass(frozen=True)
class NF4Codes:
    packed: torch.Tensor  # [N·K/2, 1] uint8: two 4-bit codebook indices per byte, row-major
    absmax: torch.Tensor  # [N·K/64] fp32, one per block of 64 weights
    shape: tuple[int, int]  # (N, K)
    dtype: torch.dtype  # what dequantizing gives (the dtype the weight was quantized from)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight: torch.Tensor = _bnb().functional.dequantize_4bit(self.packed, self.quant_state())
        return weight.to(dtype or self.dtype)

    def quant_state(self) -> Any:
        functional = _bnb().functional
        code = functional.get_4bit_type("nf4", device=self.packed.device)
        return functional.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=code,
                                     blocksize=NF4_BLOCK, quant_type="nf4", dtype=self.dtype)  # fmt: skip


def quantize_nf4(weight: torch.Tensor) -> NF4Codes:
    """NF4 codes of a dense [N, K] weight, exactly as transformers' 4-bit loading makes them."""
    if weight.numel() % NF4_BLOCK:
        raise ValueError(f"nf4 needs weights of whole blocks of {NF4_BLOCK}, got shape {tuple(weight.shape)}")
    packed, state = _bnb().functional.quantize_4bit(weight, blocksize=NF4_BLOCK, quant_type="nf4")
    return NF4Codes(packed, state.absmax, (weight.shape[0], weight.shape[1]), weight.dtype)


def concat_nf4(parts: list[NF4Codes]) -> NF4Codes:
    """Row-wise concatenation: every part is whole blocks, so the blocks (and codes) stay the same."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k or p.dtype != parts[0].dtype for p in parts):
        raise ValueError("nf4 parts of one fused module must share their input size and dtype")
    rows = sum(p.shape[0] for p in parts)
    return NF4Codes(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]), (rows, k),
                    parts[0].dtype)  # fmt: skip


class NF4Weight:
    """A module's NF4 weight for ``MultiLoRALinear``; the GEMM is bitsandbytes' ``matmul_4bit``."""

    scheme = "nf4"

    def __init__(self, codes: NF4Codes) -> None:
        self.out_features, self.in_features = codes.shape
        self.packed = codes.packed
        self.state = codes.quant_state()
        self.num_bytes = self.packed.numel() + codes.absmax.numel() * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _bnb().matmul_4bit(x.to(self.state.dtype), self.packed.t(), quant_state=self.state)
        return y.to(x.dtype)
