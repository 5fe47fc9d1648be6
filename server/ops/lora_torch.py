"""LoRA side-path ops in plain torch: the reference and the CPU fast path.

Both functions here and ``lora_triton.add_lora`` share one signature and one meaning:

    for t in range(T):                                  # every token of the step
        s = token_slots[t]                              # its adapter slot, -1 = base only
        for n, (lo, hi) in enumerate(output_slices):    # fused projections have several slices
            y[t, lo:hi] += (lora_a[s, :, n] @ x[t]) @ lora_b[s, :, lo:hi]

Slot buffers hold each adapter at its own rank r in rank rows 0..r-1 and zeros above, and the LoRA
scale (alpha/r or alpha/sqrt(r)) is already folded into ``lora_b``, so the sum above is exact for
any R >= the largest rank in the step. Callers pass rank-true views (``lora_a[:, :r]``,
``lora_b[:, :r]`` with r the largest rank among the step's slots), so an adapter costs its own rank
whatever ``max_lora_rank`` the buffers were sized for.

Layouts (one layout from the slot writer to every kernel; the hot reads are views, never copies):
    x       [T, in]            activations of one step, tokens of a slot contiguous
    y       [T, out_total]     base output, updated in place
    lora_a  [S, R, N, in]      per slot: rank-major, then output slice, so [s, :r] is one block
    lora_b  [S, R, out_total]  per slot: rank-major rows of Bᵀ, so [s, :r, lo:hi] is a plain view
The side path may run in another dtype than the base (fp32 slots under a bf16 base): x is cast to
the slots' dtype and the result is added into y in y's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

NO_SLOT = -1  # ``token_slots`` value of a token with no side path (the base model, a merged copy)


def slot_buffer_shapes(
    num_slots: int, max_rank: int, num_slices: int, in_features: int, out_total: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """The one LoRA buffer layout (see the module docstring), as the slot writer allocates it and
    every kernel reads it, without a permute or copy of the weights per forward:

        lora_a [S, R, N, in]      S = num_slots, R = max_rank, N = num_slices (fused projections)
        lora_b [S, R, out_total]  Bᵀ rows, rank-major; slice n is columns output_slices[n]
    """
    return (num_slots, max_rank, num_slices, in_features), (num_slots, max_rank, out_total)


# Below this many tokens per segment, one batched product over the used slots (tokens padded into
# a slot × position grid) beats a Python loop over segments: decode batches have ~1 token each.
DENSE_MAX_TOKENS_PER_SEGMENT = 4


@dataclass(frozen=True)
class LoRASegments:
    """Token → slot map of one step, built once by the runner and shared by every LoRA layer.

    Tokens are ordered so that all tokens of one slot form one contiguous segment. The grid of
    the decode path covers the slots first_slot .. first_slot + num_slots_used - 1 only.
    """

    token_slots: torch.Tensor  # [T] int64 on the model device; NO_SLOT = base only
    seg_starts: torch.Tensor  # [G + 1] int32 on device; token offsets of the segments
    seg_slots: torch.Tensor  # [G] int32 on device; slot of each segment (-1 segments included)
    seg_bounds: tuple[tuple[int, int, int], ...]  # host copy: (start, end, slot) with slot >= 0
    first_slot: int  # lowest slot used this step (0 when no token has an adapter)
    num_slots_used: int  # k = highest - lowest slot used + 1 (0 when no token has an adapter)
    max_rank: int | None  # largest rank among the used slots; None: unknown, use the buffers' R
    grid_len: int  # L = most tokens any slot has this step
    use_grid: bool  # decode-like: few tokens per segment, so one batched product per stage
    grid_gather: torch.Tensor | None  # [k*L] int64: token at each (slot, i) grid cell (0 in pads)
    grid_cells: torch.Tensor | None  # [V] int64: grid cells that hold a real LoRA token
    grid_tokens: torch.Tensor | None  # [V] int64: the token of each of those cells
    # grid_* are None when the grid is the token order itself (k slots in order, L tokens each)

    @property
    def has_lora(self) -> bool:
        return self.num_slots_used > 0

    @classmethod
    def build(
        cls,
        token_slots: list[int],
        device: torch.device,
        slot_ranks: Sequence[int] | None = None,
    ) -> LoRASegments:
        """Segments from a per-token slot list whose equal slots are already contiguous.

        ``slot_ranks[s]`` is the rank of the adapter in slot s (None: not known, no rank slicing).
        """
        starts = [i for i, slot in enumerate(token_slots) if i == 0 or slot != token_slots[i - 1]]
        slots = [token_slots[i] for i in starts]
        ends = [*starts[1:], len(token_slots)]
        bounds = tuple((a, b, s) for a, b, s in zip(starts, ends, slots, strict=True) if s >= 0)
        used = [s for _, _, s in bounds]
        if len(set(used)) != len(used):
            raise ValueError("tokens of one slot must be contiguous in the batch")
        first = min(used, default=0)
        num_used = max(used) - first + 1 if used else 0
        grid_len = max((b - a for a, b, _ in bounds), default=0)
        num_lora_tokens = sum(b - a for a, b, _ in bounds)

        def as_tensor(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        grid = _grid_indices(bounds, first, num_used, grid_len, len(token_slots))
        return cls(
            token_slots=as_tensor(token_slots),
            seg_starts=as_tensor([*starts, len(token_slots)], torch.int32),
            seg_slots=as_tensor(slots, torch.int32),
            seg_bounds=bounds,
            first_slot=first,
            num_slots_used=num_used,
            max_rank=None if slot_ranks is None else max((slot_ranks[s] for s in used), default=0),
            grid_len=grid_len,
            use_grid=num_lora_tokens <= DENSE_MAX_TOKENS_PER_SEGMENT * max(1, len(bounds)),
            grid_gather=None if grid is None else as_tensor(grid[0]),
            grid_cells=None if grid is None else as_tensor(grid[1]),
            grid_tokens=None if grid is None else as_tensor(grid[2]),
        )


OutputSlices = tuple[tuple[int, int], ...]  # N (lo, hi) column ranges of y, one per output slice
# The signature every side-path op shares (this module's add_lora, lora_triton's, NativeLoRA's):
# (y, x, lora_a, lora_b, segments, output_slices) -> None, y updated in place.
AddLoRA = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRASegments, OutputSlices], None]


def _grid_indices(
    bounds: tuple[tuple[int, int, int], ...], first_slot: int, num_slots: int, grid_len: int, num_tokens: int
) -> tuple[list[int], list[int], list[int]] | None:
    """(gather [k*L], cells [V], tokens [V]) for the slot × position grid; None if it is the identity."""
    is_identity = num_tokens == num_slots * grid_len and all(
        (a, b) == ((s - first_slot) * grid_len, (s - first_slot + 1) * grid_len) for a, b, s in bounds
    )
    if is_identity and len(bounds) == num_slots:
        return None
    gather = [0] * (num_slots * grid_len)
    cells: list[int] = []
    tokens: list[int] = []
    for start, end, slot in bounds:
        row = (slot - first_slot) * grid_len
        for i, token in enumerate(range(start, end)):
            gather[row + i] = token
            cells.append(row + i)
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
    """The semantics, token by token in fp32 (slow; the yardstick for every fast path)."""
    for t, slot in enumerate(segments.token_slots.tolist()):
        if slot < 0:
            continue
        for n, (lo, hi) in enumerate(output_slices):
            shrunk = lora_a[slot, :, n].float() @ x[t].float()  # [R]
            y[t, lo:hi] += (shrunk @ lora_b[slot, :, lo:hi].float()).to(y.dtype)


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
    first, k = segments.first_slot, segments.num_slots_used
    a = lora_a[first : first + k].flatten(1, 2)  # [k, R*N, in]: a view of the rank-major layout
    b = lora_b[first : first + k]  # [k, R, out_total]
    x = x.to(a.dtype)
    if segments.use_grid:
        _add_lora_grid(y, x, a, b, segments, output_slices)
    else:
        _add_lora_segments(y, x, a, b, segments, output_slices)


def _add_lora_grid(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segments: LoRASegments,
    output_slices: tuple[tuple[int, int], ...],
) -> None:
    """Decode-like steps: tokens padded into a [k slots, L] grid, one batched product per stage.

    a [k, R*N, in], b [k, R, out_total]. Each used slot's A and B are read once, by batched
    matrix-vector-like products that run far closer to memory speed than one masked product.
    """
    k, grid_len, rank, num_slices = segments.num_slots_used, segments.grid_len, b.shape[1], len(output_slices)
    x_grid = x if segments.grid_gather is None else x.index_select(0, segments.grid_gather)
    shrunk = torch.bmm(x_grid.view(k, grid_len, -1), a.transpose(1, 2))  # [k, L, R*N]
    if num_slices > 1:  # slice-major so that each slice's [k, L, R] is one block
        shrunk = shrunk.view(k, grid_len, rank, num_slices).permute(3, 0, 1, 2).contiguous()  # [N, k, L, R]
    else:
        shrunk = shrunk.unsqueeze(0)
    for n, (lo, hi) in enumerate(output_slices):
        delta = torch.bmm(shrunk[n], b[:, :, lo:hi]).view(-1, hi - lo)  # [k*L, out_n]
        if segments.grid_gather is None:
            y[:, lo:hi] += delta
        else:
            assert segments.grid_cells is not None and segments.grid_tokens is not None  # set with gather
            rows = delta.index_select(0, segments.grid_cells).to(y.dtype)
            y[:, lo:hi].index_add_(0, segments.grid_tokens, rows)


def _add_lora_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segments: LoRASegments,
    output_slices: tuple[tuple[int, int], ...],
) -> None:
    """Prefill-like steps: one shrink and one expand per (segment, slice)."""
    rank, num_slices, first = b.shape[1], len(output_slices), segments.first_slot
    for start, end, slot in segments.seg_bounds:
        shrunk = torch.mm(x[start:end], a[slot - first].T).view(end - start, rank, num_slices)  # [L, R, N]
        for n, (lo, hi) in enumerate(output_slices):
            delta = torch.mm(shrunk[:, :, n], b[slot - first, :, lo:hi])  # [L, out_n]
            y[start:end, lo:hi] += delta
