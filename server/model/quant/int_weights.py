"""Weight-only int4 and int8 codes and the torch kernels that multiply by them.

    int4 (group-wise, groups of ``group_size`` inputs):  W[n, k] = scale[n, g] · q[n, k] + minimum[n, g]
         q ∈ [0, 15], g = k // group_size; GGUF's Q4_1 blocks are exactly this (Q4_0 with minimum = -8·scale)
    int8 (per output channel):                           W[n, k] = scale[n] · q[n, k],  q ∈ [-127, 127]

``*Codes`` are the unpacked codes a checkpoint or a quantizer yields, per projection; ``concat``
joins a fused module's projections along the outputs and ``pack`` makes the ``*Weight`` its GEMM
reads. ``Int4Weight.matmul`` runs torch's CPU int4 kernel
(``_weight_int4pack_mm_for_cpu``), whose dequantization is ``(q - 8) · scale + zero``, so
``zero = minimum + 8 · scale``; it is fast with bf16 activations and 50x slower with fp32 ones, so
activations are cast to ``activation_dtype`` (measured at start) and the result back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from server.model.quant.nf4 import NF4Codes, NF4Weight, concat_nf4
from server.ops import int4_q8
from server.ops.int4_native import Int4Kernel
from server.ops.int4_q8 import Int4Q8

INT4_GROUP_SIZE = 32  # GGUF's block size; quantizing a dense checkpoint uses the same
INT4_INNER_K_TILES = 2  # what the CPU kernel packs for (2, 4 or 8; it only changes the layout)
# the CPU kernel packs outputs in blocks of 64 (AVX-512 builds) or 32 (AVX2): ``Int4Weight._unpacked_codes``
PACK_ROWS_CANDIDATES = (64, 32)


@dataclass(frozen=True)
class Int4Codes:
    codes: torch.Tensor  # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N, K / G] fp32
    minimum: torch.Tensor  # [N, K / G] fp32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in ``dtype``, computed in fp32."""
        group = self.codes.shape[1] // self.scale.shape[1]
        scale = self.scale.repeat_interleave(group, dim=1)
        minimum = self.minimum.repeat_interleave(group, dim=1)
        return (self.codes.float() * scale + minimum).to(dtype)


@dataclass(frozen=True)
class Int8Codes:
    codes: torch.Tensor  # [N, K] int8 in [-127, 127]
    scale: torch.Tensor  # [N] fp32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scale[:, None]).to(dtype)


Codes = Int4Codes | Int8Codes | NF4Codes


class QuantizedWeight(Protocol):
    """What ``MultiLoRALinear`` needs of a quantized base weight."""

    scheme: str  # "int4" or "int8"
    out_features: int
    in_features: int
    num_bytes: int  # what one GEMM reads

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] → x · Wᵀ [T, out] in x's dtype."""
        ...


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Codes:
    """Min-max codes of a dense [N, K] weight, per group of ``group_size`` inputs (K must divide)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)  # [N, K/G]
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    return Int4Codes(codes.reshape(n, k).to(torch.uint8), scale, low)


def quantize_int8(weight: torch.Tensor) -> Int8Codes:
    """Symmetric per-output-channel codes of a dense [N, K] weight."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    codes = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Codes(codes, scale)


class Int4Weight:
    """Packed int4 codes for torch's CPU kernel, with scales and zeros in the activation dtype.

    The kernel's time grows with the tokens of the call (it is 7x slower than a dense bf16 GEMM for
    a prefill of 360 tokens on an AMX Xeon), so calls of at least ``dequantize_min_rows`` tokens
    (measured at start by the factory; None: never) unpack the codes into a dense weight for that
    call instead.
    """

    scheme = "int4"

    def __init__(
        self,
        codes: Int4Codes,
        activation_dtype: torch.dtype = torch.bfloat16,
        native: Int4Kernel | None = None,
    ) -> None:
        """``native``: a kernel of ``server/ops/int4_native`` for calls of at least ``native.min_rows``
        tokens, where the start-up measurement found it faster; it keeps its own packing too."""
        self.out_features, self.in_features = codes.codes.shape
        self.group_size = self.in_features // codes.scale.shape[1]
        self.activation_dtype = activation_dtype
        self.dequantize_min_rows: int | None = None
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.codes.to(torch.int32), INT4_INNER_K_TILES
        )  # [N, K/2] uint8
        zero = codes.minimum + 8 * codes.scale
        # [K/G, N, 2]: the kernel's layout of (scale, zero) per group and output
        self.scales_and_zeros = torch.stack([codes.scale.T, zero.T], dim=2).to(activation_dtype).contiguous()
        self._scale = codes.scale.float()[:, :, None]  # [N, K/G, 1], for ``dequantize`` (computed in fp32)
        self._minimum = codes.minimum.float()[:, :, None]
        self.num_bytes = (
            self.packed.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        )
        fits = native is not None and native.fits(self.out_features, self.in_features)
        self.native = native if fits else None
        self.native_packed = (
            self.native.pack(codes.codes, codes.scale, codes.minimum) if self.native is not None else None
        )  # uint8, in the kernel's layout
        # the packing is torch's own: unpacking serves only where it gives these codes back
        self._pack_rows = next(
            (rows for rows in PACK_ROWS_CANDIDATES
             if self.out_features % rows == 0 and torch.equal(self._unpacked_codes(rows), codes.codes)),
            None,
        )  # fmt: skip
        self.can_unpack = self._pack_rows is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.dequantize_min_rows
        if rows is not None and x.shape[0] >= rows and self.can_unpack:
            dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else self.activation_dtype
            return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)  # unpacked in x's dtype
        if self.native is not None and self.native_packed is not None and x.shape[0] >= self.native.min_rows:
            out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
            return self.native.matmul(x, self.native_packed, out_dtype).to(x.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.activation_dtype), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] in ``dtype`` (default: the activation dtype; a fresh tensor each call)."""
        n, k = self.out_features, self.in_features
        codes = self._unpacked_codes().view(n, k // self.group_size, self.group_size).float()
        return torch.addcmul(self._minimum, codes, self._scale).view(n, k).to(dtype or self.activation_dtype)

    def _unpacked_codes(self, pack_rows: int | None = None) -> torch.Tensor:
        """[N, K] uint8 from the CPU kernel's packing: per block of B outputs (64 or 32, as this
        CPU's build packs), [K, B/2] bytes whose low nibbles are the block's first B/2 outputs."""
        n, k = self.out_features, self.in_features
        rows = pack_rows or self._pack_rows or PACK_ROWS_CANDIDATES[0]
        blocks = self.packed.view(n // rows, k, rows // 2)
        both = torch.cat([blocks & 0x0F, blocks >> 4], dim=2)  # [N/64, K, 64]
        return both.transpose(1, 2).reshape(n, k)


class Int8Weight:
    """int8 codes for torch's weight-only int8 kernel (``_weight_int8pack_mm``)."""

    scheme = "int8"

    def __init__(self, codes: Int8Codes, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        self.out_features, self.in_features = codes.codes.shape
        self.activation_dtype = activation_dtype
        self.codes = codes.codes.contiguous()
        self.scale = codes.scale.to(activation_dtype)
        self.num_bytes = self.codes.numel() + self.scale.numel() * self.scale.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
            x.to(self.activation_dtype), self.codes, self.scale
        )
        return y.to(x.dtype)


def concat(parts: list[torch.Tensor | Codes]) -> torch.Tensor | Codes:
    """A fused module's weight from its projections, concatenated along the outputs: dense when
    every part is dense, else codes of the one kind every part has (ValueError for a mix)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p for p in parts if isinstance(p, torch.Tensor)])
    if all(isinstance(p, Int4Codes) for p in parts):
        int4 = [p for p in parts if isinstance(p, Int4Codes)]
        return Int4Codes(*(torch.cat([getattr(p, f) for p in int4]) for f in ("codes", "scale", "minimum")))
    if all(isinstance(p, Int8Codes) for p in parts):
        int8 = [p for p in parts if isinstance(p, Int8Codes)]
        return Int8Codes(torch.cat([p.codes for p in int8]), torch.cat([p.scale for p in int8]))
    if all(isinstance(p, NF4Codes) for p in parts):
        return concat_nf4([p for p in parts if isinstance(p, NF4Codes)])
    kinds = sorted({type(p).__name__ for p in parts})
    raise ValueError(f"the projections of one fused module are stored differently ({', '.join(kinds)})")


def pack(
    codes: Codes, activation_dtype: torch.dtype, int4_native: Int4Kernel | None = None
) -> QuantizedWeight:
    """The weight the GEMM reads, from a module's codes (``int4_native``: see ``Int4Weight``)."""
    if isinstance(codes, NF4Codes):
        return NF4Weight(codes)  # computes in the dtype it was quantized from
    if isinstance(codes, Int4Codes):
        return Int4Weight(codes, activation_dtype, int4_native)
    return Int8Weight(codes, activation_dtype)


class Int8LMHead:
    """The LM head on int8 codes (a GGUF's own Q8_0 blocks: W = scale · code per group of 32) with
    int8 activations, on ``server/ops/int4_q8.c``; ``matmul`` serves calls of at most ``max_rows``
    tokens (measured at start by the factory; None above: the caller's dense head)."""

    def __init__(self, kernel: Int4Q8, codes: torch.Tensor, scale: torch.Tensor, max_rows: int = 8) -> None:
        self.kernel = kernel
        self.packed = int4_q8.pack_int8(codes, scale)  # [V/8, hidden/32, 288] uint8
        self.num_bytes = self.packed.numel()
        self.max_rows = max_rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, hidden] → fp32 logits [T, V], or None for more than ``max_rows`` tokens."""
        if x.shape[0] > self.max_rows:
            return None
        return self.kernel.matmul_int8(x, self.packed, torch.float32)
