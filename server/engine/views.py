"""What the engine shows the outside: the token deltas it streams and frozen, typed snapshots.

The HTTP layer, the metrics and the dashboard see the engine only through ``Engine``'s methods and
these values; none of them reaches into the scheduler, the adapter cache or the merged copies.
Each snapshot is taken in one pass, from any thread, and may straddle an engine step; it never
blocks one for long.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from adapters.cache import AdapterCache, AdapterState, Tier, Transition
from server.engine.merging import CopyState, MergedCopy, MergeManager
from server.engine.sampler import TopLogprobs
from server.stats import CacheCounters


@dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's raw logprob given the tokens before it, and the most likely tokens at its
    position (``SamplingParams.prompt_logprobs`` of them); the first token has neither (None)."""

    logprobs: list[float | None]  # [prompt length]
    top_logprobs: list[TopLogprobs | None]  # [prompt length]


@dataclass(frozen=True)
class TokenDelta:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float | None]
    finish_reason: str | None  # stop, length, abort, error; None while running
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    # with ``error``: an OpenAI-style code (``draining``, ``adapter_load_failed``, ...)
    error_code: str | None = None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token; () where none asked
    prompt_logprobs: PromptLogprobs | None = None  # in the first delta of a request that asked


@dataclass(frozen=True)
class EngineLimits:
    """The engine's fixed limits, as configured and as the loaded model allows."""

    max_num_seqs: int  # sequences in the running batch
    max_model_len: int  # prompt + output tokens per request
    max_loras: int  # device slots: distinct adapters per step on the side path
    max_lora_rank: int  # largest adapter rank accepted
    max_logprobs: int = 20  # most alternatives per token a request may ask for (EngineConfig's)


@dataclass(frozen=True)
class EngineStats:
    """The engine's queues now (``Engine.stats``)."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float  # used KV blocks / all KV blocks, in [0, 1]
    running_adapter_ids: tuple[str, ...]  # distinct adapters of the running sequences, sorted
    waiting_adapter_ids: tuple[str, ...]  # distinct adapters of the waiting sequences, sorted
    max_loras: int
    num_preemptions: int  # since start
    # prefix caching, since start: tokens looked up at admission, and found cached (vLLM's counters)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_blocks: int = 0  # KV blocks whose content is cached now (held or idle)
    prefix_cache_bytes: int = 0  # their bytes: part of the KV cache's budget, never beyond it
    prefix_cache_evictions: int = 0  # cached blocks whose content was dropped for room

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Cached tokens / looked-up tokens since start; None before any lookup."""
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else None


@dataclass(frozen=True)
class StepStats:
    """What one non-empty step did, as a step observer sees it (in the engine thread)."""

    num_seqs: int
    num_tokens: int  # tokens fed to the forward: prefill chunks + one per decode
    num_prompt_tokens: int  # whole prompts of requests whose first prefill chunk ran (once per request)
    num_generated_tokens: int  # tokens sampled
    num_adapters: int  # distinct adapters in the batch (the base model not counted)
    duration_s: float  # schedule + forward + sampling + detokenization
    num_waiting: int  # the queues, KV usage and merged copies right after the step
    num_running: int
    kv_cache_usage: float
    num_merged_copies: int


@dataclass(frozen=True)
class CacheSnapshot:
    """The adapter tiers now, and their counters since start."""

    adapters_by_state: dict[AdapterState, int]  # registered adapters per state, every state present
    lookups: dict[Tier, int]  # where try_activate found adapters: slot and host are hits, disk a miss
    evictions: dict[Tier, int]  # adapters evicted from the slot and the host tier
    num_loads: int  # disk → host loads that succeeded
    num_load_failures: int
    recent_load_seconds: tuple[float, ...]  # the most recent successful loads (up to 1024), sorted
    host_bytes: int  # adapter bytes in host memory, slot-resident ones included

    @property
    def num_registered(self) -> int:
        return sum(self.adapters_by_state.values())


@dataclass(frozen=True)
class AdapterRuntime:
    """One registered adapter version's place in the engine now."""

    state: AdapterState
    is_pinned: bool
    is_merged: bool  # a READY merged copy takes its new requests


@dataclass(frozen=True)
class MergedCopyView:
    adapter_id: str
    state: CopyState
    num_bytes: int  # 0 while building
    num_leases: int  # requests running on it
    is_pinned: bool  # an operator merged it: the policy never drops it


@dataclass(frozen=True)
class MergeSnapshot:
    """The merged copies serving new requests (building or ready) and the counters since start."""

    copies: tuple[MergedCopyView, ...]
    bytes_held: int  # ready and draining copies
    num_merges: int
    num_unmerges: int
    build_seconds_sum: float
    tokens_merged: int  # tokens computed on merged copies
    tokens_base_forward: int  # tokens computed in the base forward (side path or base only)


def cache_snapshot(cache: AdapterCache) -> CacheSnapshot:
    by_state = cache.count_by_state()
    stats = cache.stats
    return CacheSnapshot(
        adapters_by_state={state: by_state[state] for state in AdapterState},
        lookups={tier: stats.lookups[tier] for tier in Tier},
        evictions={
            Tier.SLOT: stats.transitions[Transition.EVICT_SLOT],
            Tier.HOST: stats.transitions[Transition.EVICT_HOST],
        },
        num_loads=stats.num_loads,
        num_load_failures=stats.transitions[Transition.LOAD_FAIL],
        recent_load_seconds=tuple(sorted(stats.load_seconds)),
        host_bytes=cache.host_bytes(),
    )


def cache_lookups(cache: AdapterCache, prefix_hits: int = 0, prefix_queries: int = 0) -> CacheCounters:
    lookups = cache.stats.lookups
    hits = lookups[Tier.SLOT] + lookups[Tier.HOST]
    return CacheCounters(hits, hits + lookups[Tier.DISK], prefix_hits, prefix_queries)


def adapter_runtime(
    cache: AdapterCache, merges: MergeManager, adapter_ids: Iterable[str]
) -> dict[str, AdapterRuntime]:
    """Each of ``adapter_ids`` that is registered now (others are left out: deleted or replaced)."""
    out: dict[str, AdapterRuntime] = {}
    for adapter_id in adapter_ids:
        try:
            status = cache.status(adapter_id)
        except KeyError:
            continue
        out[adapter_id] = AdapterRuntime(status.state, status.is_pinned, merges.is_merged(adapter_id))
    return out


def merge_snapshot(merges: MergeManager) -> MergeSnapshot:
    stats = merges.stats
    return MergeSnapshot(
        copies=tuple(_copy_view(copy) for copy in list(merges.copies.values())),
        bytes_held=merges.bytes_held(),
        num_merges=stats.num_merges,
        num_unmerges=stats.num_unmerges,
        build_seconds_sum=stats.build_seconds_sum,
        tokens_merged=stats.tokens_merged,
        tokens_base_forward=stats.tokens_base_forward,
    )


def _copy_view(copy: MergedCopy) -> MergedCopyView:
    return MergedCopyView(copy.adapter_id, copy.state, copy.num_bytes, copy.num_leases, copy.is_pinned)
