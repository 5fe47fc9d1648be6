"""The decode step's attention as a Triton kernel over the paged KV cache: the CUDA fast path.

``decode_attention`` and ``rope_and_cache`` have the signatures and meaning of
``attention_torch``'s (layouts documented there). ``rope_and_cache`` is one launch over (token,
head) that rotates q in place in qkv and k on its way into the cache. Where the torch version
gathers every sequence's padded K/V rows into copies, this kernel reads the head-major cache in
place through ``kv_index`` and stops at each sequence's ``kv_lens`` (``kv_bias`` is not read):

    grid (sequence, kv head, partition): one program per kv head serves all H / H_kv query heads
    of its group (GQA: each K/V row is loaded once for the whole group, as one tl.dot operand);
    it walks its partition of the sequence's positions in blocks of BLOCK_N rows, gathers the
    rows through kv_index and keeps an online softmax (running max, sum, weighted V) in fp32.

Long contexts are split into partitions of ``partition_rows`` positions (flash-decoding), so a
small batch still fills the GPU; a second kernel merges the partitions' fp32 partial results.
The grid and the number of partitions come from the shapes only (``kv_index.shape``), never from
the values of ``kv_lens``: no host sync, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from server.ops.lora_triton import FP32_PRECISION, pow2_block
from server.ops.lora_triton import TRITON_AVAILABLE as TRITON_AVAILABLE  # for the factory

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from server.ops.lora_triton import INTERPRETED, dot_fp32

BLOCK_N = 32  # cached positions per step of a program's loop
PARTITION_ROWS = 512  # positions per program before the work is split (flash-decoding)
MAX_PARTITIONS = 32
MAX_HEAD_DIM, MAX_GROUP = 256, 64
LOG2_E = math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x·log2 e)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if TRITON_AVAILABLE:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, index_ptr, lens_ptr, out_ptr, stats_ptr,
        sq_b, sq_h, sq_d, sk_h, sk_r, sk_d, sv_h, sv_r, sv_d, si_b,
        so_b, so_h, so_p, so_d, ss_b, ss_h, ss_p,
        group, head_dim, max_len, partition_rows, qk_scale,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One (sequence b, kv head, partition p): softmax(q·Kᵀ·scale)·V over positions
        [p·partition_rows, min((p + 1)·partition_rows, len)) for the group's query heads.

        PARTIAL: writes the unnormalised fp32 sum and (max, sum of weights) in base 2 for the merge;
        else the normalised output (zeros for a sequence of length 0, e.g. a padded graph slot).
        """
        seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kv_head * group + g  # [BLOCK_G] query heads of this kv head
        g_mask, d_mask = g < group, d < head_dim
        q_ptrs = q_ptr + seq.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d
        q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D], as the reference casts q to the cache
        seq_len = tl.minimum(tl.load(lens_ptr + seq), max_len).to(tl.int64)
        start = part.to(tl.int64) * partition_rows  # the loop's bounds: one integer type
        end = tl.minimum(start + partition_rows, seq_len)
        k_head = k_ptr + kv_head.to(tl.int64) * sk_h
        v_head = v_ptr + kv_head.to(tl.int64) * sv_h
        m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max (base 2)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of weights
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # running weighted V
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_mask = pos < end
            rows = tl.load(index_ptr + seq.to(tl.int64) * si_b + pos, mask=n_mask, other=0)  # [BLOCK_N]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_head + rows[:, None] * sk_r + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            v = tl.load(v_head + rows[:, None] * sv_r + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            scores = dot_fp32(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # [BLOCK_G, BLOCK_N]
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot_fp32(p.to(v.dtype), v, PRECISION, UPCAST)
            m = m_new
        out_ptrs = out_ptr + seq.to(tl.int64) * so_b + heads[:, None] * so_h + part * so_p + d[None, :] * so_d
        out_mask = g_mask[:, None] & d_mask[None, :]
        if PARTIAL:
            tl.store(out_ptrs, acc, mask=out_mask)
            stats = stats_ptr + seq.to(tl.int64) * ss_b + heads * ss_h + part * ss_p
            tl.store(stats, m, mask=g_mask)
            tl.store(stats + 1, total, mask=g_mask)
        else:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _rope_and_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, index_ptr, k_ptr, v_ptr,
        sx_t, sx_c, sc_t, sc_d, ss_t, ss_d, sk_h, sk_r, sk_d, sv_h, sv_r, sv_d,
        num_heads, num_kv_heads, half,
        BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        """One (token t, head j of the H + 2·H_kv in qkv): j < H rotates q in place in qkv; the
        next H_kv rotate k into k_cache[:, write_index[t]]; the last H_kv copy v into v_cache."""
        token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        d = tl.arange(0, BLOCK_HALF)
        mask = d < half
        x_ptrs = qkv_ptr + token * sx_t + (head * 2 * half + d) * sx_c
        lo = tl.load(x_ptrs, mask=mask, other=0.0)  # [BLOCK_HALF] first half of the head
        hi = tl.load(x_ptrs + half * sx_c, mask=mask, other=0.0)
        row = tl.load(index_ptr + token)
        if head < num_heads + num_kv_heads:
            cos_lo = tl.load(cos_ptr + token * sc_t + d * sc_d, mask=mask, other=0.0).to(tl.float32)
            cos_hi = tl.load(cos_ptr + token * sc_t + (half + d) * sc_d, mask=mask, other=0.0).to(tl.float32)
            sin_lo = tl.load(sin_ptr + token * ss_t + d * ss_d, mask=mask, other=0.0).to(tl.float32)
            sin_hi = tl.load(sin_ptr + token * ss_t + (half + d) * ss_d, mask=mask, other=0.0).to(tl.float32)
            new_lo = lo.to(tl.float32) * cos_lo - hi.to(tl.float32) * sin_lo  # rotate half: (-hi, lo)
            new_hi = hi.to(tl.float32) * cos_hi + lo.to(tl.float32) * sin_hi
            if head < num_heads:
                tl.store(x_ptrs, new_lo.to(lo.dtype), mask=mask)
                tl.store(x_ptrs + half * sx_c, new_hi.to(lo.dtype), mask=mask)
            else:
                k_row = k_ptr + (head - num_heads).to(tl.int64) * sk_h + row * sk_r
                tl.store(k_row + d * sk_d, new_lo.to(k_ptr.dtype.element_ty), mask=mask)
                tl.store(k_row + (half + d) * sk_d, new_hi.to(k_ptr.dtype.element_ty), mask=mask)
        else:
            v_row = v_ptr + (head - num_heads - num_kv_heads).to(tl.int64) * sv_h + row * sv_r
            tl.store(v_row + d * sv_d, lo.to(v_ptr.dtype.element_ty), mask=mask)
            tl.store(v_row + (half + d) * sv_d, hi.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_kernel(
        part_ptr, stats_ptr, out_ptr, num_parts, head_dim,
        sp_b, sp_h, sp_p, sp_d, ss_b, ss_h, ss_p, so_b, so_h, so_d,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, query head): the partitions' partial results → the normalised output."""
        seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        p = tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        p_mask = p < num_parts
        stats = stats_ptr + seq * ss_b + head * ss_h + p * ss_p
        m = tl.load(stats, mask=p_mask, other=float("-inf"))  # [BLOCK_P]; -inf: an empty partition
        total = tl.load(stats + 1, mask=p_mask, other=0.0)
        m_all = tl.max(m, axis=0)
        weight = tl.exp2(m - tl.where(m_all > float("-inf"), m_all, 0.0))  # 0 for empty partitions
        denom = tl.sum(weight * total, axis=0)
        part_ptrs = part_ptr + seq * sp_b + head * sp_h + p[:, None] * sp_p + d[None, :] * sp_d
        parts = tl.load(part_ptrs, mask=p_mask[:, None] & (d < head_dim)[None, :], other=0.0)
        out = tl.sum(parts * weight[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)  # [BLOCK_D]
        out_ptrs = out_ptr + seq * so_b + head * so_h + d * so_d
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_index: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """``attention_torch.rope_and_cache`` as one launch: q is rotated in place in ``qkv`` and
    returned as its view [T, H, D]; k (rotated) and v are written to the cache rows ``write_index``.

    Products in fp32, each value rounded once to its destination's dtype.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("attention_triton.rope_and_cache needs triton; install loraplex[triton]")
    _check_rope_inputs(qkv, cos, sin, write_index, k_cache, v_cache, num_heads, num_kv_heads)
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    if num_tokens:
        _rope_and_cache_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
            qkv, cos, sin, write_index, k_cache, v_cache,
            *qkv.stride(), *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(),
            num_heads, num_kv_heads, head_dim // 2,
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )  # fmt: skip
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor,
    kv_bias: torch.Tensor,
    scale: float,
    *,
    partition_rows: int = PARTITION_ROWS,
) -> torch.Tensor:
    """``attention_torch.decode_attention``: q [Bd, H, D] (any strides) → [Bd, H, D] in q's dtype.

    ``kv_bias`` is not read: ``kv_lens`` bounds each sequence (values past ``kv_index.shape[1]``
    are clamped to it). ``partition_rows``: positions per program before a sequence is split.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("attention_triton.decode_attention needs triton; install loraplex[triton]")
    _check_inputs(q, k_cache, v_cache, kv_index, kv_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k_cache.shape[0], kv_index.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [Bd, H, D]
    if num_seqs == 0:
        return out
    num_parts, part_rows = _partitions(max_len, partition_rows)
    if num_parts == 1:
        partial, stats = out.unsqueeze(2), out  # [Bd, H, 1, D]: the output itself; no stats
    else:
        partial = torch.empty(num_seqs, num_heads, num_parts, head_dim, device=q.device)  # fp32
        stats = torch.empty(num_seqs, num_heads, num_parts, 2, device=q.device)  # (max, sum) fp32
    block_d = pow2_block(head_dim)
    _decode_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, k_cache, v_cache, kv_index, kv_lens, partial, stats,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), kv_index.stride(0),
        *partial.stride(), *stats.stride()[:3],
        num_heads // num_kv_heads, head_dim, max_len, part_rows, scale * LOG2_E,
        BLOCK_G=pow2_block(num_heads // num_kv_heads), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        PARTIAL=num_parts > 1, PRECISION=FP32_PRECISION, UPCAST=INTERPRETED,
    )  # fmt: skip
    if num_parts > 1:
        _merge_kernel[(num_seqs, num_heads)](
            partial, stats, out, num_parts, head_dim,
            *partial.stride(), *stats.stride()[:3], *out.stride(),
            BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_d,
        )  # fmt: skip
    return out


def _partitions(max_len: int, partition_rows: int) -> tuple[int, int]:
    """(partitions per sequence, positions per partition: a multiple of BLOCK_N) for Lmax."""
    rows = max(BLOCK_N, triton.cdiv(partition_rows, BLOCK_N) * BLOCK_N)
    num_parts = min(MAX_PARTITIONS, triton.cdiv(max_len, rows))
    rows = triton.cdiv(triton.cdiv(max_len, num_parts), BLOCK_N) * BLOCK_N
    return max(1, triton.cdiv(max_len, rows)), rows


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices only (reading values would sync with the GPU)."""
    _require(q.dim() == 3 and q.dtype in _DTYPES, "q must be float [Bd, H, D]")
    _require(
        k_cache.dim() == 3 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
        "k_cache and v_cache must be [H_kv, rows, D] alike",
    )
    _require(k_cache.dtype in _DTYPES, "the cache must be float32, float16 or bfloat16")
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[0]
    _require(k_cache.shape[2] == head_dim and 0 < head_dim <= MAX_HEAD_DIM, "unsupported head dim")
    _require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP,
        "unsupported head grouping",
    )
    _require(
        kv_index.dim() == 2 and kv_index.shape[0] == q.shape[0] and kv_index.dtype == torch.int64,
        "kv_index must be int64 [Bd, Lmax]",
    )
    _require(kv_index.stride(1) == 1, "kv_index must have a unit innermost stride")
    _require(
        kv_lens.shape == (q.shape[0],) and kv_lens.dtype == torch.int64 and kv_lens.is_contiguous(),
        "kv_lens must be contiguous int64 [Bd]",
    )
    devices = {t.device for t in (q, k_cache, v_cache, kv_index, kv_lens)}
    _require(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_rope_inputs(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_index: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Shapes, dtypes and devices only (the values of ``write_index`` are the caller's contract)."""
    _require(
        k_cache.dim() == 3 and k_cache.shape == v_cache.shape and k_cache.shape[0] == num_kv_heads,
        f"k_cache and v_cache must be [H_kv={num_kv_heads}, rows, D] alike",
    )
    head_dim = k_cache.shape[2]
    _require(head_dim % 2 == 0 and 0 < head_dim <= MAX_HEAD_DIM, "unsupported head dim")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _require(qkv.dim() == 2 and qkv.shape[1] == width, f"qkv must be [T, {width}]")
    _require(qkv.dtype in _DTYPES and k_cache.dtype in _DTYPES, "dtypes must be float32, float16 or bfloat16")
    rows = (qkv.shape[0], head_dim)
    _require(cos.shape == rows and sin.shape == rows, f"cos and sin must be [T, D] = {list(rows)}")
    _require(
        write_index.shape == (qkv.shape[0],)
        and write_index.dtype == torch.int64
        and write_index.is_contiguous(),
        "write_index must be contiguous int64 [T]",
    )
    devices = {t.device for t in (qkv, cos, sin, write_index, k_cache, v_cache)}
    _require(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"triton attention kernel: {message}")
