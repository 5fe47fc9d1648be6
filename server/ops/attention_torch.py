"""The decode step's attention around the paged KV cache, in plain torch: the reference and the
default. ``attention_native`` has the same two functions as one C call each.

Layouts (all on one device, one dtype for the activations, one for the cache):
    qkv      [T, (H + 2·H_kv)·D]  fused projection output of the step's T tokens, heads contiguous
    cos, sin [T, D]               RoPE rows of each token's position, rotate-half convention
    k_cache, v_cache [H_kv, rows, D]  head-major paged cache; ``write_index`` [T] int64 its rows
    q        [Bd, H, D]           one query per decode sequence (any row stride)
    kv_index [Bd, Lmax] int64     cache rows of each sequence's positions 0..len-1, then padding
    kv_lens  [Bd] int64           cached positions per sequence (>= 1; this step's token included)
    kv_bias  [Bd, 1, 1, Lmax] fp32  0 for the first len rows, -inf for the padding
"""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionOps(Protocol):
    """The decode step's attention kernels: this module itself, or ``attention_native.NativeAttention``."""

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_index: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor: ...

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_index: torch.Tensor,
        kv_lens: torch.Tensor,
        kv_bias: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, D] → rotated x (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
    """Rotate q and k, write k and v into the cache rows ``write_index`` → q [T, H, D] (rotated).

    The returned q may be a view of ``qkv`` (the native kernel rotates it in place); the K and
    V rows of this step are in the cache afterwards, so attention reads them with the rest.
    """
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(num_tokens, -1, head_dim)
    qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))  # [T, H + H_kv, D]
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, -1, head_dim)
    k_cache.index_copy_(1, write_index, k.transpose(0, 1).to(k_cache.dtype))  # head-major
    v_cache.index_copy_(1, write_index, v.transpose(0, 1).to(v_cache.dtype))
    return q


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor,
    kv_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [Bd, H, D], one query per decode sequence → [Bd, H, D] over its cached K/V.

    Plain batched products over (kv head, sequence) instead of SDPA, which for one query per
    sequence costs 3x more on CPU in bf16. The head-major cache makes every operand a view:
    no transposing copies. Scores and softmax are in fp32, as in SDPA. ``kv_lens`` is not read
    here (``kv_bias`` masks the padding); the native kernel reads it instead.
    """
    num_seqs, max_len = kv_index.shape
    num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    groups = q.shape[1] // num_kv_heads
    rows = kv_index.view(-1)  # [Bd·Lmax]
    k = k_cache.index_select(1, rows).view(-1, max_len, head_dim)  # [H_kv·Bd, Lmax, D]
    v = v_cache.index_select(1, rows).view(-1, max_len, head_dim)
    qg = q.reshape(num_seqs, num_kv_heads, groups, head_dim).transpose(0, 1)  # [H_kv, Bd, g, D]
    scores = torch.bmm(qg.reshape(-1, groups, head_dim).to(k.dtype), k.transpose(1, 2)).float()
    scores = scores.view(num_kv_heads, num_seqs, groups, max_len).mul_(scale)  # [H_kv, Bd, g, Lmax]
    probs = torch.softmax(scores.add_(kv_bias.view(1, num_seqs, 1, max_len)), dim=-1)
    out = torch.bmm(probs.to(v.dtype).view(-1, groups, max_len), v)  # [H_kv·Bd, g, D]
    return out.view(num_kv_heads, num_seqs, groups, head_dim).transpose(0, 1).reshape(q.shape).to(q.dtype)
