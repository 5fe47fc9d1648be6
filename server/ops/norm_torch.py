"""The decoder layer's element-wise glue in plain torch: the reference and the default.
``norm_native`` has the same two functions as one C call each.

    hidden, residual [T, H]   a layer's output and the running residual stream, one dtype
    weight           [H]      an RMSNorm's weight, the activations' dtype
    gate_up          [T, 2·I] the fused gate|up projection's output
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class NormOps(Protocol):
    """This module itself, or ``norm_native.NativeNorms``."""

    def add_rms_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


def add_rms_norm(
    hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(r) · weight, r) with r = residual + hidden (r = hidden where residual is None).

    One fused op (bit-identical to transformers' formula in fp32; in bf16 it rounds once, after the
    weight, where transformers rounds before it too). Callers hand ``residual`` over: r may be
    written into it (``norm_native`` does), here it is a new tensor; r is ``hidden`` without one."""
    residual = hidden if residual is None else residual + hidden
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up → [T, I], for gate_up [T, 2·I] holding gate then up."""
    inter = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
