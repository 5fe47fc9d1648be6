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
    num_slots_used: int  # k = 1 + highest slot used this step (0 when no token has an adapter)
    grid_len: int  # L = most tokens any slot has this step
    grid_gather: torch.Tensor | None  # [k*L] int64: token at each (slot, i) grid cell (0 in pads)
    grid_cells: torch.Tensor | None  # [V] int64: grid cells that hold a real LoRA token
    grid_tokens: torch.Tensor | None  # [V] int64: the token of each of those cells
    # grid_* are None when the grid is the token order itself (slots 0..k-1, L tokens each)

    @property
    def has_lora(self) -> bool:
        return self.num_slots_used > 0

    @property
    def use_grid(self) -> bool:
        num_lora_tokens = sum(end - start for start, end, _ in self.seg_bounds)
        return num_lora_tokens <= DENSE_MAX_TOKENS_PER_SEGMENT * max(1, len(self.seg_bounds))

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device, dtype: torch.dtype) -> LoRASegments:
        """Segments from a per-token slot list whose equal slots are already contiguous."""
        starts = [i for i, slot in enumerate(token_slots) if i == 0 or slot != token_slots[i - 1]]
        slots = [token_slots[i] for i in starts]
        ends = [*starts[1:], len(token_slots)]
        bounds = tuple((a, b, s) for a, b, s in zip(starts, ends, slots, strict=True) if s >= 0)
        if len({s for _, _, s in bounds}) != len(bounds):
            raise ValueError("tokens of one slot must be contiguous in the batch")
        num_used = 1 + max((s for _, _, s in bounds), default=-1)
        grid_len = max((b - a for a, b, _ in bounds), default=0)
        as_tensor = lambda v, dt=torch.int64: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        grid = _grid_indices(bounds, num_used, grid_len, len(token_slots))
        return cls(
            token_slots=as_tensor(token_slots),
            seg_starts=as_tensor([*starts, len(token_slots)], torch.int32),
            seg_slots=as_tensor(slots, torch.int32),
            seg_bounds=bounds,
            num_slots_used=num_used,
            grid_len=grid_len,
            grid_gather=None if grid is None else as_tensor(grid[0]),
            grid_cells=None if grid is None else as_tensor(grid[1]),
            grid_tokens=None if grid is None else as_tensor(grid[2]),
        )


def _grid_indices(bounds, num_slots: int, grid_len: int, num_tokens: int):
    """(gather [k*L], cells [V], tokens [V]) for the slot × position grid; None if it is the identity."""
    if (
        num_tokens == num_slots * grid_len
        and all((a, b, s) == (s * grid_len, (s + 1) * grid_len, s) for a, b, s in bounds)
        and len(bounds) == num_slots
    ):
        return None
    gather = [0] * (num_slots * grid_len)
    cells, tokens = [], []
    for start, end, slot in bounds:
        for i, token in enumerate(range(start, end)):
            gather[slot * grid_len + i] = token
            cells.append(slot * grid_len + i)
            tokens.append(token)
    return gather, cells, tokens


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
    lora_b_slots = lora_b.permute(1, 0, 2)  # [S, out_total, R]: each slot's B rows contiguous
    if segments.use_grid:
        _add_lora_grid(y, x, lora_a, lora_b_slots, segments, output_slices)
    else:
        _add_lora_segments(y, x, lora_a, lora_b_slots, segments, output_slices)


def _add_lora_grid(y, x, lora_a, lora_b_slots, segments, output_slices) -> None:
    """Decode-like steps: tokens padded into a [k slots, L] grid, one batched product per stage.

    Each used slot's A and B are read once, by batched matrix-vector-like products that MKL runs
    far closer to memory speed than one wide masked product.
    """
    k, grid_len, rank = segments.num_slots_used, segments.grid_len, lora_a.shape[2]
    x_grid = x if segments.grid_gather is None else x.index_select(0, segments.grid_gather)
    x_grid = x_grid.view(k, grid_len, -1)  # [k, L, in]
    shrunk = torch.bmm(x_grid, lora_a[:k].flatten(1, 2).transpose(1, 2))  # [k, L, N*R]
    for n, (lo, hi) in enumerate(output_slices):
        shrunk_n = shrunk[:, :, n * rank : (n + 1) * rank]  # [k, L, R]
        delta = torch.bmm(shrunk_n, lora_b_slots[:k, lo:hi].transpose(1, 2))  # [k, L, out_n]
        if segments.grid_gather is None:
            y[:, lo:hi] += delta.view(-1, hi - lo)
        else:
            rows = delta.view(-1, hi - lo).index_select(0, segments.grid_cells)
            y[:, lo:hi].index_add_(0, segments.grid_tokens, rows)


def _add_lora_segments(y, x, lora_a, lora_b_slots, segments, output_slices) -> None:
    """Prefill-like steps: one shrink and one expand per (segment, slice)."""
    for start, end, slot in segments.seg_bounds:
        shrunk = torch.matmul(x[start:end], lora_a[slot].transpose(-1, -2))  # [N, L, R]
        for n, (lo, hi) in enumerate(output_slices):
            y[start:end, lo:hi].addmm_(shrunk[n], lora_b_slots[slot, lo:hi].T)
