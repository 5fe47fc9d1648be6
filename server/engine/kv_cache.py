"""The paged KV cache: one K and one V tensor per layer, handed out in fixed-size blocks.

A sequence owns a list of blocks (its block table); token ``i`` of the sequence lives in row
``block_table[i // block_size] * block_size + i % block_size`` of every layer's K and V (dim 1:
the tensors are head-major, [H_kv, rows, D], so one head's gathered rows are contiguous).
"""

from __future__ import annotations

from collections import OrderedDict
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
    """KV blocks with reference counts, and the prefix cache's index of full blocks by content.

    A block is in exactly one of three states:
    - free: no sequence holds it and it caches nothing;
    - held: ``refcount`` sequences have it in their block tables (more than one only for a cached
      block that several sequences share as their common prefix);
    - cached and idle: no sequence holds it, but its K/V are indexed by ``block_hash`` and may be
      taken again by a later sequence with the same prefix (``take``), until it is evicted.

    ``allocate`` hands out free blocks first, then evicts idle cached blocks, least recently
    released first, so cached prefixes live as long as memory allows. ``num_free`` counts both
    (what a sequence may still get). Not thread-safe: only the engine loop touches it.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refcount = [0] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        self._hash_of_block: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unheld blocks: LRU first
        self.num_evictions = 0  # cached blocks whose content was dropped to make room

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def usage(self) -> float:
        """Held blocks / all blocks: idle cached blocks count as free (they are evicted on demand)."""
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks whose content is indexed (held or idle)."""
        return len(self._hash_of_block)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = [self._free.pop() if self._free else self._evict_oldest() for _ in range(count)]
        for block in blocks:
            self._refcount[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A cached block nobody holds stays indexed (idle); the
        table's last blocks are released first, so under pressure a prefix's tail goes first."""
        for block in reversed(blocks):
            self._refcount[block] -= 1
            assert self._refcount[block] >= 0, f"block {block} freed more often than held"
            if self._refcount[block] > 0:
                continue
            if block in self._hash_of_block:
                self._idle[block] = None
            else:
                self._free.append(block)

    # ---- the prefix cache's index ----
    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding the K/V of the full block identified by ``block_hash``, if cached."""
        return self._block_of_hash.get(block_hash)

    def take(self, block: int) -> None:
        """One more reference to a cached block (held or idle) found by ``cached_block``."""
        assert block in self._hash_of_block, f"block {block} is not cached"
        self._idle.pop(block, None)
        self._refcount[block] += 1

    def publish(self, block: int, block_hash: bytes) -> None:
        """Index a held, full block under ``block_hash``. If another block already caches that
        content (two sequences computed the same prefix at once), this one stays private."""
        assert self._refcount[block] > 0, f"block {block} is not held"
        if block_hash in self._block_of_hash or block in self._hash_of_block:
            return
        self._block_of_hash[block_hash] = block
        self._hash_of_block[block] = block_hash

    def _evict_oldest(self) -> int:
        block, _ = self._idle.popitem(last=False)
        del self._block_of_hash[self._hash_of_block.pop(block)]
        self.num_evictions += 1
        return block


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
        self.block_bytes = block_size * kv_bytes_per_token(config, dtype)  # K and V of every layer
        self.num_bytes = num_blocks * self.block_bytes

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
