"""A request's state inside the engine: tokens, KV blocks, adapter slot, sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from server.engine.grammar import GrammarState
from server.engine.sampler import SamplingParams, TopLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and an adapter reference
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine could not serve it (e.g. its adapter failed to load)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_id: str | None  # None = the bare base model
    arrival_index: int  # FCFS order
    generator: torch.Generator | None = None  # set when sampling.seed is given
    grammar: GrammarState | None = None  # set when sampling.grammar is given: where its tokens are in it
    adapter_lease: object | None = None  # held while running: pins this adapter version in its slot
    merged_copy: object | None = None  # held while running on a merged copy of its adapter (no slot)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # () where none were asked
    # sampling.prompt_logprobs set: prompt tokens 1, 2, ... scored so far (token 0 has no context)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in this sequence's blocks
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_skipped_steps: int = 0  # steps it was ready to run but left waiting (starvation guard)
    tenant: str = "default"  # who asked: the fair scheduler shares the engine between tenants
    priority: int = 0  # lower first, among its tenant's own waiting sequences (vLLM's meaning)
    arrival_s: float = field(default_factory=time.monotonic)  # when it reached the engine (queue time)
    # prefix caching (server/engine/prefix_cache.py); cache_root None: this sequence is not cached
    cache_root: bytes | None = None  # parent hash of its first block: weights, tenant, cache_salt
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far, in order
    num_published_blocks: int = 0  # leading blocks of block_table indexed in the prefix cache
    num_cached_tokens: int = 0  # tokens found cached at its last admission (their prefill skipped)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed before the next sample (prompt + outputs after a preemption)."""
        return self.num_tokens - self.num_computed_tokens

    def prompt_scoring_positions(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits score a prompt token not scored yet: position p's
        next-token logits give token p + 1's logprob. Empty unless ``prompt_logprobs`` is asked for,
        and after a preemption (the prompt was scored before)."""
        if self.sampling.prompt_logprobs is None:
            return range(0)
        first = len(self.prompt_logprobs)  # scores token first + 1
        return range(max(start, first), min(end, len(self.prompt_token_ids) - 1))

    def token_at(self, index: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        return (
            self.prompt_token_ids[index] if index < num_prompt else self.output_token_ids[index - num_prompt]
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
