"""LoRA side-path ops in plain torch: the reference and the CPU fast path.

Both functions here and ``lora_triton.add_lora`` share one signature and one meaning:

    for t in range(T):                                  # every token of the step
        s = token_slots[t]                              # its adapter slot, -1 = base only
        for n, (lo, hi) in enumerate(output_slices):    # fused projections have several slices
            y[t, lo:hi] += lora_b[lo:hi, s, :] @ (lora_a[s, n] @ x[t])

Slot buffers are padded with zeros up to the configured max rank R, and the LoRA scale
(alpha/r or alpha/sqrt(r)) is already folded into ``lora_b``, so the sum above is exact.

Layouts (chosen so that the hot reads are views, never copies):
    x       [T, in]            activations of one step, tokens of a slot contiguous
    y       [T, out_total]     base output, updated in place
    lora_a  [S, N, R, in]      per slot, per output slice, rank rows
    lora_b  [out_total, S, R]  slot-major within a row so that B[:, :k] is one [out, k*R] view
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this many tokens per segment, one dense product over all used slots (masked per token)
# beats a Python loop over segments: decode batches have ~1 token per segment.
DENSE_MAX_TOKENS_PER_SEGMENT = 4


@dataclass(frozen=True)
class LoRASegments:
    """Token → slot map of one step, built once by the runner and shared by every LoRA layer.

    Tokens are ordered so that all tokens of one slot form one contiguous segment.
    """

    token_slots: torch.Tensor  # [T] int64 on the model device; -1 = base only
    seg_starts: torch.Tensor  # [G + 1] int32 on device; token offsets of the segments
    seg_slots: torch.Tensor  # [G] int32 on device; slot of each segment (-1 segments included)
    seg_bounds: tuple[tuple[int, int, int], ...]  # host copy: (start, end, slot) with slot >= 0
    num_slots_used: int  # 1 + highest slot used this step (0 when no token has an adapter)
    slot_onehot: torch.Tensor | None  # [T, num_slots_used] in the model dtype; None when unused

    @property
    def has_lora(self) -> bool:
        return self.num_slots_used > 0

    @property
    def use_dense(self) -> bool:
        num_lora_tokens = sum(end - start for start, end, _ in self.seg_bounds)
        return num_lora_tokens <= DENSE_MAX_TOKENS_PER_SEGMENT * max(1, len(self.seg_bounds))

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device, dtype: torch.dtype) -> LoRASegments:
        """Segments from a per-token slot list whose equal slots are already contiguous."""
        starts: list[int] = []
        slots: list[int] = []
        for i, slot in enumerate(token_slots):
            if i == 0 or slot != token_slots[i - 1]:
                starts.append(i)
                slots.append(slot)
        ends = [*starts[1:], len(token_slots)]
        bounds = tuple((a, b, s) for a, b, s in zip(starts, ends, slots, strict=True) if s >= 0)
        if len({s for _, _, s in bounds}) != len(bounds):
            raise ValueError("tokens of one slot must be contiguous in the batch")
        num_used = 1 + max((s for _, _, s in bounds), default=-1)
        slots_t = torch.tensor(token_slots, dtype=torch.int64, device=device)
        onehot = None
        if num_used:
            onehot = (slots_t.unsqueeze(1) == torch.arange(num_used, device=device)).to(dtype)
        return cls(
            token_slots=slots_t,
            seg_starts=torch.tensor([*starts, len(token_slots)], dtype=torch.int32, device=device),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
            seg_bounds=bounds,
            num_slots_used=num_used,
            slot_onehot=onehot,
        )


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: LoRASegments,
    output_slices: tuple[tuple[int, int], ...],
) -> None:
    """The semantics, token by token (slow; the yardstick for every fast path)."""
    for t, slot in enumerate(segments.token_slots.tolist()):
        if slot < 0:
            continue
        for n, (lo, hi) in enumerate(output_slices):
            shrunk = lora_a[slot, n].float() @ x[t].float()  # [R]
            y[t, lo:hi] += (lora_b[lo:hi, slot, :].float() @ shrunk).to(y.dtype)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: LoRASegments,
    output_slices: tuple[tuple[int, int], ...],
) -> None:
    """CPU fast path: no per-token weight gather; each used slot's weights are read once."""
    if not segments.has_lora:
        return
    if segments.use_dense:
        _add_lora_dense(y, x, lora_a, lora_b, segments, output_slices)
    else:
        _add_lora_segments(y, x, lora_a, lora_b, segments, output_slices)


def _add_lora_dense(y, x, lora_a, lora_b, segments, output_slices) -> None:
    """One product against slots [0, k) for all tokens, masked to each token's own slot.

    Computed in transposed space (W·xᵀ rather than x·Wᵀ): MKL runs these few-row products
    markedly faster that way on CPU, and the weights are read in their stored layout.
    """
    k = segments.num_slots_used
    num_slices, rank = lora_a.shape[1], lora_a.shape[2]
    shrunk_t = lora_a[:k].reshape(k * num_slices * rank, -1) @ x.T  # [k*N*R, T]
    shrunk_t = shrunk_t.view(k, num_slices, rank, -1) * segments.slot_onehot.T[:, None, None, :]
    for n, (lo, hi) in enumerate(output_slices):
        shrunk_n = shrunk_t[:, n].reshape(k * rank, -1)  # [k*R, T]
        y[:, lo:hi] += (lora_b[lo:hi, :k, :].reshape(hi - lo, k * rank) @ shrunk_n).T


def _add_lora_segments(y, x, lora_a, lora_b, segments, output_slices) -> None:
    """One shrink and one expand per (segment, slice): for prefill-heavy steps."""
    for start, end, slot in segments.seg_bounds:
        shrunk = torch.matmul(x[start:end], lora_a[slot].transpose(-1, -2))  # [N, L, R]
        for n, (lo, hi) in enumerate(output_slices):
            y[start:end, lo:hi].addmm_(shrunk[n], lora_b[lo:hi, slot, :].T)
