"""The paged KV cache: one K and one V tensor per layer, handed out in fixed-size blocks.

A sequence owns a list of blocks (its block table); token ``i`` of the sequence lives in row
``block_table[i // block_size] * block_size + i % block_size`` of every layer's K and V (dim 1:
the tensors are head-major, [H_kv, rows, D], so one head's gathered rows are contiguous).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Zeroing the cache is paid at every start, and a CPU serves few long sequences at once.
DEFAULT_CPU_KV_BYTES_CAP = 512 << 20


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element_bytes = torch.empty((), dtype=dtype).element_size()
    num_bytes: int = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_bytes
    return num_bytes


class BlockAllocator:
    """Free list of KV blocks. Not thread-safe: only the engine loop touches it."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """Per-layer K/V tensors [H_kv, num_blocks·block_size, D] plus the block allocator."""

    def __init__(
        self,
        config: PretrainedConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rows = num_blocks * block_size
        shape = (config.num_key_value_heads, rows, head_dim)  # head-major: decode reads are views
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.num_bytes = num_blocks * block_size * kv_bytes_per_token(config, dtype)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def sized(
        cls,
        config: PretrainedConfig,
        budget_bytes: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        num_blocks = budget_bytes // (kv_bytes_per_token(config, dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={budget_bytes} is too small for one block of {block_size} tokens"
            )
        return cls(config, num_blocks, block_size, dtype, device)
