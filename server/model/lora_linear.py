"""MultiLoRALinear: a frozen Linear plus per-slot LoRA side paths, one slot per resident adapter.

    y = x·Wᵀ + b + Σ_slot [token in slot] · (x·A_slotᵀ)·B_slotᵀ

Slot buffers are allocated once (``max_loras`` slots of up to ``max_lora_rank`` rank rows), so
activating an adapter is a copy into a slot, never an allocation. Each step reads the slots only up
to the largest rank among its adapters, so a rank-16 adapter costs rank 16 whatever the buffers'
size. The LoRA scale (α/r, or α/√r for rsLoRA) is folded into B when the slot is written. The slots
may be held in another dtype than the base weight (``lora_dtype``: fp32 under a bf16 base on CPUs
where that is faster, as measured at start by server/model/cpu_tuning.py). A fused projection
(q|k|v, gate|up) has one output slice per original projection; each slice has its own A and B,
so peft adapters that target any subset of the original projections map onto it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from server.model.cpu_tuning import base_gemm, prepare_weight
from server.model.quant.int_weights import Codes, QuantizedWeight, pack
from server.ops import lora_torch
from server.ops.int4_native import Int4Kernel
from server.ops.lora_torch import AddLoRA, LoRASegments


def _pick_add_lora(device: torch.device) -> AddLoRA:
    if device.type == "cuda":
        from server.ops import lora_triton

        if lora_triton.TRITON_AVAILABLE:
            return lora_triton.add_lora
    return lora_torch.add_lora


# On some CPUs the GEMM of a few rows (decode) is faster as W·xᵀ than as x·Wᵀ, on others slower;
# cpu_tuning measures which at start. It applies to batches of at most this many rows.
SMALL_BATCH_ROWS = 32


def base_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemm: str = "x_wt"
) -> torch.Tensor:
    """x [T, in] · weight [out, in]ᵀ (+ bias) → [T, out], contiguous, with the measured kernel.

    ``weight`` is as ``prepare_weight(w, gemm)`` made it (reordered for oneDNN, else plain).
    """
    return base_gemm(x, weight, bias, gemm == "w_xt" and x.shape[0] <= SMALL_BATCH_ROWS)


class _RequiredLinearKwargs(TypedDict):
    max_loras: int
    max_lora_rank: int
    target_names: tuple[str, ...]


class LinearKwargs(_RequiredLinearKwargs, total=False):
    """The keyword arguments of ``MultiLoRALinear`` shared by every layer of a model."""

    lora_dtype: torch.dtype | None
    gemm: str
    lora_op: AddLoRA | None
    activation_dtype: torch.dtype
    int4_native: Int4Kernel | None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with ``max_loras`` LoRA slots over named output slices.

    ``slice_names[n]`` is the original projection (``q_proj``, …) whose outputs are the columns
    ``output_slices[n]`` of this layer. Only slices named in ``target_names`` accept adapters.
    """

    lora_a: torch.Tensor  # [S, R, N, in] buffer (registered in __init__)
    lora_b: torch.Tensor  # [S, R, out_total] buffer

    if TYPE_CHECKING:  # nn.Module.__call__ (which runs forward) returns Any: give calls forward's types

        def __call__(self, x: torch.Tensor, lora: LoRASegments) -> torch.Tensor: ...

    def __init__(
        self,
        weight: torch.Tensor | Codes,  # [out_total, in], dense or quantized codes (server/model/quant/)
        bias: torch.Tensor | None,  # [out_total]
        slice_names: tuple[str, ...],
        slice_sizes: tuple[int, ...],
        max_loras: int,
        max_lora_rank: int,
        target_names: tuple[str, ...],
        lora_dtype: torch.dtype | None = None,  # None: the weight's dtype (required for a quantized one)
        gemm: str = "x_wt",  # base GEMM kernel (cpu_tuning.GEMM_KERNELS, measured per CPU)
        lora_op: AddLoRA | None = None,  # the side-path op (lora_torch.add_lora's signature); None: default
        activation_dtype: torch.dtype = torch.bfloat16,  # what a quantized GEMM computes in (measured)
        int4_native: Int4Kernel | None = None,  # int4 GEMMs of enough tokens on a native kernel (measured)
    ) -> None:
        super().__init__()
        # A quantized base keeps no dense weight: its GEMM reads the codes, and merged copies
        # (which start from the dense weight) are not made over it.
        self.quantized: QuantizedWeight | None = None
        if isinstance(weight, torch.Tensor):
            out_total, in_features = weight.shape
        else:
            self.quantized = pack(weight, activation_dtype, int4_native)
            out_total, in_features = self.quantized.out_features, self.quantized.in_features
        if sum(slice_sizes) != out_total:
            raise ValueError(f"slice sizes {slice_sizes} do not add up to {out_total} outputs")
        if self.quantized is not None and lora_dtype is None:
            raise ValueError("a quantized base weight needs lora_dtype: the side path's dtype")
        dense = weight if isinstance(weight, torch.Tensor) else torch.empty(out_total, 0, dtype=lora_dtype)
        self.weight = nn.Parameter(dense, requires_grad=False)  # [out_total, in], or [out_total, 0] quantized
        self._in_features = in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.slice_names = slice_names
        offsets = [0]
        for size in slice_sizes:
            offsets.append(offsets[-1] + size)
        self.output_slices = tuple(itertools.pairwise(offsets))
        self.lora_names = tuple(n for n in slice_names if n in target_names)
        self.has_lora_buffers = bool(self.lora_names)
        self.max_lora_rank = max_lora_rank
        self.gemm = gemm
        # What the base GEMM reads: the weight itself, or a copy reordered for oneDNN (the plain
        # weight is kept for merged copies and sizing).
        self.gemm_weight = (
            prepare_weight(dense, gemm) if gemm == "onednn" and self.quantized is None else self.weight
        )
        # The one layout of server/ops/lora_torch.py, used as stored by every kernel.
        num_slots = max_loras if self.lora_names else 0  # no slots for a module no adapter targets
        shape_a, shape_b = lora_torch.slot_buffer_shapes(
            num_slots, max_lora_rank, len(slice_names), in_features, out_total
        )
        dtype = lora_dtype or dense.dtype
        self.register_buffer(
            "lora_a", dense.new_zeros(shape_a, dtype=dtype), persistent=False
        )  # [S, R, N, in]
        self.register_buffer("lora_b", dense.new_zeros(shape_b, dtype=dtype), persistent=False)  # [S, R, out]
        self._add_lora = lora_op or _pick_add_lora(dense.device)
        # A merged copy (W + s·B·A, made by ``prepare``) to use instead of ``gemm_weight`` for the
        # current forward; set and cleared by the engine around the forward of a merged copy's batch.
        self.active_weight: torch.Tensor | None = None

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight like ``self.weight`` (a merged copy) as this layer's GEMM reads it."""
        return prepare_weight(weight, self.gemm)

    @property
    def in_features(self) -> int:
        return self._in_features

    def slice_out_features(self, name: str) -> int:
        lo, hi = self.output_slices[self.slice_names.index(name)]
        return hi - lo

    def forward(self, x: torch.Tensor, lora: LoRASegments) -> torch.Tensor:
        """x [T, in] → [T, out_total]; tokens of slot -1 get exactly the base output."""
        if self.quantized is not None:
            y = self.quantized.matmul(x)
            if self.bias is not None:
                y.add_(self.bias)
        else:
            weight = self.gemm_weight if self.active_weight is None else self.active_weight
            y = base_linear(x, weight, self.bias, self.gemm)
        if self.has_lora_buffers and lora.has_lora:
            rank = self.max_lora_rank if lora.max_rank is None else lora.max_rank
            self._add_lora(y, x, self.lora_a[:, :rank], self.lora_b[:, :rank], lora, self.output_slices)
        return y

    @torch.inference_mode()
    def set_slot(
        self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
    ) -> None:
        """Copy one adapter into ``slot``: ``weights[name] = (A [r, in], B [out_n, r])``.

        Slices the adapter does not target are zeroed, so a slot never keeps a previous tenant's
        weights. B is multiplied by ``scale`` on the way in.
        """
        unknown = set(weights) - set(self.lora_names)
        if unknown:
            raise ValueError(f"this layer has no LoRA slice for {sorted(unknown)}")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for n, name in enumerate(self.slice_names):
            if name not in weights:
                continue
            lora_a, lora_b = weights[name]
            rank = lora_a.shape[0]
            lo, hi = self.output_slices[n]
            self.lora_a[slot, :rank, n].copy_(lora_a)
            self.lora_b[slot, :rank, lo:hi].copy_((lora_b.to(torch.float32) * scale).T)

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.has_lora_buffers:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
