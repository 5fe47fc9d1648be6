"""Merge a LoRA adapter into a copy of a base weight: W' = W + s·B·A, per output slice.

Reference semantics, for one slice ``lo:hi`` of a (possibly fused) weight W [out, in]:

    merged = W.float().clone()
    merged[lo:hi] += scale * (B.float() @ A.float())     # B [hi-lo, r], A [r, in]
    return merged.to(W.dtype)

The product is accumulated in fp32 whatever the serving dtype, then cast once, so a merged copy in
bf16 differs from the side path only by that one rounding. The base weight is never modified.
"""

from __future__ import annotations

import torch


def merged_weight(
    weight: torch.Tensor,  # [out_total, in], the frozen base weight
    deltas: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]],  # ((lo, hi), A [r, in], B [hi-lo, r])
    scale: float,
) -> torch.Tensor:
    """A new tensor like ``weight`` with every slice's ``scale·B·A`` added (fp32 accumulation)."""
    merged = weight.to(torch.float32, copy=True)  # [out_total, in]
    for (lo, hi), lora_a, lora_b in deltas:
        if lora_b.shape[0] != hi - lo or lora_a.shape[1] != weight.shape[1]:
            raise ValueError(
                f"slice {lo}:{hi} of a {tuple(weight.shape)} weight cannot take B {tuple(lora_b.shape)} "
                f"· A {tuple(lora_a.shape)}"
            )
        a32 = lora_a.to(device=weight.device, dtype=torch.float32)
        b32 = lora_b.to(device=weight.device, dtype=torch.float32)
        merged[lo:hi].addmm_(b32, a32, alpha=scale)
    return merged.to(weight.dtype)
