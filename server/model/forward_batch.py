"""The one per-step batch description: built by the runner, read by the model.

A step is a flat run of T tokens from B sequences (decode tokens and prefill chunks mixed), ordered
so that the tokens of each adapter slot are contiguous. Attention runs in two groups: decode
sequences (one query token each) in one padded batched call, and prefill chunks one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.ops.lora_torch import LoRASegments


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence that feeds more than one token this step."""

    token_start: int  # first token of the chunk in the flat batch
    token_end: int  # one past its last token
    kv_index: torch.Tensor  # [ctx_len] int64 flat KV-cache rows of positions 0..ctx_len-1
    # ctx_len = tokens already cached + this chunk; the chunk is the last token_end - token_start


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    kv_write_index: torch.Tensor  # [T] int64, flat KV-cache row where each token's K/V go
    decode_token_index: torch.Tensor | None  # [Bd] int64, flat token index of each decode sequence
    decode_kv_index: torch.Tensor | None  # [Bd, Lmax] int64, KV rows of each decode seq (padded with 0)
    decode_kv_bias: torch.Tensor | None  # [Bd, 1, 1, Lmax] fp32: 0 where a KV row is real, -inf in pads
    decode_kv_lens: torch.Tensor | None  # [Bd] int64, real KV rows of each decode seq (its first ones)
    decode_is_all_tokens: bool  # the decode sequences are the whole batch, in token order
    prefills: tuple[PrefillChunk, ...]
    logits_index: torch.Tensor  # [B_logits] int64, tokens whose next-token logits are needed
    lora: LoRASegments

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
