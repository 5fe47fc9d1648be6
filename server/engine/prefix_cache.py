"""Automatic prefix caching: a sequence starts its prefill after the longest run of full KV blocks
that an earlier sequence computed from the same tokens, with the same weights, for the same caller.

A full block is identified by a chained hash:

    hash(block i) = sha256(hash(block i - 1) ‖ token ids of block i)     hash(block -1) = root
    root = sha256(weights identity, tenant, cache_salt)                  (``cache_root``)

so equal hashes mean equal tokens from position 0 on, computed by equal weights. The weights
identity is the adapter's content (``AdapterCache.content_key``: its stored sha256 with the
config that scales it, or a composition's content key), never its name or id, so a re-uploaded
adapter never hits the old version's blocks; the base model's is None. A merged copy and the
side path of one adapter compute the same function, so they share. The tenant keeps one tenant's
requests from hitting (and timing) another's blocks, unless the operator shares the base model's
blocks (``--prefix-cache-sharing base``); ``cache_salt`` (vLLM's request field) splits further.

Contracts:
- ``attach`` runs when a sequence with no blocks is admitted (first time, or after a preemption):
  it takes a reference to each hit block and marks their tokens computed. At least the last token
  always stays uncomputed, so the step that feeds it has logits to sample from. A sequence that
  scores its prompt (``prompt_logprobs``) only reuses positions it has already scored: every other
  one needs its logits.
- ``publish`` indexes each block of a running sequence as soon as all its tokens are computed
  (after prefill chunks and decodes alike); cached blocks are never written again (a sequence
  writes only positions past its computed ones, and those never lie in a full block).
- Releasing a sequence's blocks (finish, abort, preemption) leaves their content cached until
  ``BlockAllocator.allocate`` needs the memory (least recently released first).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable

from server.engine.kv_cache import BlockAllocator
from server.engine.sequence import Sequence


def cache_root(weights_key: str | None, tenant: str | None, cache_salt: str | None) -> bytes:
    """The parent hash of a sequence's first block: whose weights computed it, and for whom."""
    identity = {"weights": weights_key, "tenant": tenant, "cache_salt": cache_salt}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()


def block_hash(parent: bytes, token_ids: Iterable[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class PrefixCache:
    """The scheduler's side of prefix caching over one ``BlockAllocator`` (engine loop only).

    ``num_queries`` and ``num_hits`` count tokens as vLLM's ``prefix_cache_queries`` / ``_hits``
    do: every admission that looks its sequence up adds the sequence's tokens to the first and
    the tokens found cached to the second (a sequence readmitted after a preemption counts again).
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, enabled: bool = True) -> None:
        self.allocator, self.block_size, self.enabled = allocator, block_size, enabled
        self.num_queries = 0
        self.num_hits = 0

    def attach(self, seq: Sequence) -> int:
        """Give ``seq`` (no blocks yet) its cached prefix; return the tokens it skips."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "attach before any block"
        blocks: list[int] = []
        for block_hash_ in self._hashes(seq, self._reusable_tokens(seq) // self.block_size):
            block = self.allocator.cached_block(block_hash_)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self.allocator.take(block)
        seq.block_table = blocks
        seq.num_published_blocks = len(blocks)
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.block_size
        return seq.num_cached_tokens

    def detach(self, seq: Sequence) -> None:
        """Undo ``attach`` (and any blocks reserved after it): seq was not admitted after all."""
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_published_blocks = seq.num_computed_tokens = seq.num_cached_tokens = 0

    def count_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's lookup in the hit-rate counters (unless it could reuse nothing,
        as a request scoring its whole prompt: vLLM leaves those out too)."""
        if self._reusable_tokens(seq) > 0:
            self.num_queries += seq.num_tokens
            self.num_hits += seq.num_cached_tokens

    def publish(self, seq: Sequence) -> None:
        """Index the blocks of ``seq`` (running) that its computed tokens have filled."""
        if seq.cache_root is None or not self.enabled:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_published_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for index in range(seq.num_published_blocks, num_full):
            self.allocator.publish(seq.block_table[index], hashes[index])
        seq.num_published_blocks = num_full

    def _reusable_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of ``seq`` may come from the cache (0: it does not look)."""
        if seq.cache_root is None or not self.enabled:
            return 0
        limit = seq.num_tokens - 1  # the last token is fed: its logits give the next token
        if seq.sampling.prompt_logprobs is not None:
            limit = min(limit, len(seq.prompt_logprobs))  # positions below are scored already
        return limit

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of seq's first ``count`` full blocks (computed once, kept on the sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < count:
            assert seq.cache_root is not None, "only a cached sequence has block hashes"
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else seq.cache_root
            hashes.append(block_hash(parent, (seq.token_at(i) for i in range(start, start + bs))))
        return hashes[:count]
