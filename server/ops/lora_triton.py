"""LoRA side path as SGMV-style Triton kernels: the GPU fast path.

Same signature and meaning as ``lora_torch.add_lora_reference`` (layouts are documented there):

    for t in range(T):                                  # every token of the step
        s = token_slots[t]                              # its adapter slot, -1 = base only
        for n, (lo, hi) in enumerate(output_slices):    # fused projections have several slices
            y[t, lo:hi] += (lora_a[s, :, n] @ x[t]) @ lora_b[s, :, lo:hi]

Tokens of one slot are contiguous, so the batch is a list of G segments (``seg_starts`` /
``seg_slots``). Two kernels, both gridded over (segment, token block[, column block]):

    shrink   h[seg, :] = x[seg] @ A[slot]^T for all N slices at once, into a fp32 temp [T, N*R]
    expand   y[seg, lo:hi] += h[seg, n*R:(n+1)*R] @ B[slot, :, lo:hi], one launch per slice n

Every program reads only its own segment's weights (no per-token gather), accumulates in fp32
and exits at once when its segment has slot -1 or its token block lies past the segment's end;
so base-only tokens are never read or written. The grid is sized on the host from G and the
longest LoRA segment (``seg_bounds``), which needs no device sync.
"""

from __future__ import annotations

import torch

from server.ops.lora_torch import LoRASegments

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    TRITON_AVAILABLE = False

MIN_BLOCK = 16  # tl.dot needs every block dim >= 16
MAX_BLOCK_M = 64  # tokens per program
BLOCK_K = 32  # shrink: input features per step of the K loop
BLOCK_N = 64  # expand: output columns per program
FP32_PRECISION = "ieee"  # fp32 inputs: exact products, no silent tf32 truncation


if TRITON_AVAILABLE:

    @triton.jit
    def dot_fp32(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32. The interpreter multiplies the raw bits of bf16 operands
        (triton-lang/triton#11584), so there they go through fp32: the same exact products."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _segment_rows(seg_starts_ptr, seg_slots_ptr, BLOCK_M: tl.constexpr):
        """(slot, block's first token, segment end, token rows [BLOCK_M] int64, row mask)."""
        seg = tl.program_id(0)
        slot = tl.load(seg_slots_ptr + seg)
        start = tl.load(seg_starts_ptr + seg)
        end = tl.load(seg_starts_ptr + seg + 1)
        offs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = (start + offs).to(tl.int64)
        return slot, start + tl.program_id(1) * BLOCK_M, end, rows, rows < end

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, h_ptr, seg_starts_ptr, seg_slots_ptr,
        in_features, rank, num_nr,
        sx_t, sx_k, sa_s, sa_n, sa_r, sa_k, sh_t, sh_j,
        BLOCK_M: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """h[rows, j] = sum_k x[rows, k] * A[slot, j // R, j % R, k] for j < N*R."""
        slot, block_start, end, rows, row_mask = _segment_rows(seg_starts_ptr, seg_slots_ptr, BLOCK_M)
        if slot < 0 or block_start >= end:
            return
        cols = tl.arange(0, BLOCK_NR)  # [BLOCK_NR] flattened (slice, rank) index
        a_cols = slot.to(tl.int64) * sa_s + (cols // rank) * sa_n + (cols % rank) * sa_r
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_NR), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + ks
            x_mask = row_mask[:, None] & (k < in_features)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx_t + k[None, :] * sx_k, mask=x_mask, other=0.0)
            a_mask = (k < in_features)[:, None] & (cols < num_nr)[None, :]
            a = tl.load(a_ptr + a_cols[None, :] + k[:, None] * sa_k, mask=a_mask, other=0.0)
            acc += dot_fp32(x, a.to(x.dtype), PRECISION, UPCAST)  # [BLOCK_M, BLOCK_NR]
        h_mask = row_mask[:, None] & (cols < num_nr)[None, :]
        tl.store(h_ptr + rows[:, None] * sh_t + cols[None, :] * sh_j, acc, mask=h_mask)

    @triton.jit
    def _expand_kernel(
        h_ptr, b_ptr, y_ptr, seg_starts_ptr, seg_slots_ptr,
        h_col0, col_lo, width, rank,
        sh_t, sh_j, sb_o, sb_s, sb_r, sy_t, sy_o,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """y[rows, lo + c] += sum_r h[rows, h_col0 + r] * B[lo + c, slot, r] for c < width."""
        slot, block_start, end, rows, row_mask = _segment_rows(seg_starts_ptr, seg_slots_ptr, BLOCK_M)
        if slot < 0 or block_start >= end:
            return
        r = tl.arange(0, BLOCK_R)
        c = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        h_mask = row_mask[:, None] & (r < rank)[None, :]
        h = tl.load(h_ptr + rows[:, None] * sh_t + (h_col0 + r)[None, :] * sh_j, mask=h_mask, other=0.0)
        b_off = (col_lo + c)[None, :].to(tl.int64) * sb_o + slot.to(tl.int64) * sb_s + r[:, None] * sb_r
        b_mask = (r < rank)[:, None] & (c < width)[None, :]
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)  # [BLOCK_R, BLOCK_N]
        delta = dot_fp32(h.to(b.dtype), b, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N] fp32
        y_ptrs = y_ptr + rows[:, None] * sy_t + (col_lo + c)[None, :] * sy_o
        y_mask = row_mask[:, None] & (c < width)[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)

    # Kernels decorated under TRITON_INTERPRET=1 run on CPU tensors through numpy.
    INTERPRETED = not isinstance(_shrink_kernel, triton.runtime.JITFunction)


def pow2_block(n: int, cap: int | None = None) -> int:
    """Power of two >= max(n, 16), optionally capped."""
    size: int = max(MIN_BLOCK, triton.next_power_of_2(n))
    return size if cap is None else min(size, cap)


def add_lora(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, R, N, in] (any strides: rank-true views of the slot buffers)
    lora_b: torch.Tensor,  # [S, R, out_total]
    segments: LoRASegments,
    output_slices: tuple[tuple[int, int], ...],  # N (lo, hi) column ranges of y
) -> None:
    """SGMV shrink then one expand per output slice; updates ``y`` in place."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("lora_triton.add_lora needs triton; install loraplex[triton]")
    if not segments.has_lora or not segments.seg_bounds:
        return
    rank, num_slices = lora_a.shape[1], lora_a.shape[2]
    if len(output_slices) > num_slices:
        raise ValueError(f"{len(output_slices)} output slices but lora_a has {num_slices}")
    max_len = max(end - start for start, end, _ in segments.seg_bounds)
    block_m = pow2_block(max_len, MAX_BLOCK_M)
    grid_mg = (segments.seg_slots.shape[0], triton.cdiv(max_len, block_m))  # (G, token blocks)
    h = _shrink(x, lora_a, segments, grid_mg, block_m)  # [T, N*R] fp32
    block_r = pow2_block(rank)
    for n, (lo, hi) in enumerate(output_slices):
        grid = (*grid_mg, triton.cdiv(hi - lo, BLOCK_N))
        _expand_kernel[grid](
            h, lora_b, y, segments.seg_starts, segments.seg_slots,
            n * rank, lo, hi - lo, rank,
            *h.stride(), lora_b.stride(2), lora_b.stride(0), lora_b.stride(1), *y.stride(),
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_R=block_r,
            PRECISION=FP32_PRECISION, UPCAST=INTERPRETED,
        )  # fmt: skip


def _shrink(
    x: torch.Tensor, lora_a: torch.Tensor, segments: LoRASegments, grid: tuple[int, int], block_m: int
) -> torch.Tensor:
    """h = x @ A[slot]^T per segment, all slices at once: [T, N*R] fp32 (base rows unwritten)."""
    num_nr = lora_a.shape[1] * lora_a.shape[2]
    sa_s, sa_r, sa_n, sa_k = lora_a.stride()
    h = torch.empty(x.shape[0], num_nr, device=x.device, dtype=torch.float32)  # [T, N*R]
    _shrink_kernel[grid](
        x, lora_a, h, segments.seg_starts, segments.seg_slots,
        x.shape[1], lora_a.shape[1], num_nr,
        *x.stride(), sa_s, sa_n, sa_r, sa_k, *h.stride(),
        BLOCK_M=block_m, BLOCK_NR=pow2_block(num_nr), BLOCK_K=BLOCK_K,
        PRECISION=FP32_PRECISION, UPCAST=INTERPRETED,
    )  # fmt: skip
    return h
