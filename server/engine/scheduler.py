"""Which sequences run in the next step, and how many tokens each feeds.

Policy, in order, every step:
1. Running sequences keep going: decodes first (one token each), then unfinished prefills in
   chunks, within ``max_num_batched_tokens``. When KV blocks run out, the newest running sequence
   is preempted (blocks freed, recomputed later from its prompt + outputs).
2. Waiting sequences are admitted in the order of the admission policy (server/engine/fairness.py:
   fair between tenants by default, first come first served with ``--scheduling fcfs``), while
   sequences, tokens and KV blocks last; the policy is told every sequence scheduled. A waiting
   sequence whose adapter would exceed ``max_loras`` distinct adapters, or is not resident yet
   (its load runs in the background), is skipped without blocking the ones behind it,
   unless it has been skipped ``STARVATION_STEPS`` times: then nothing behind it is admitted until
   it gets in, so running sequences drain and free an adapter slot for it.
3. An admitted sequence starts after the longest prefix of full KV blocks already cached for the
   same tokens, weights and caller (server/engine/prefix_cache.py): it shares those blocks, and
   the blocks it fills are published for later ones.
4. A sequence admitted while its adapter has a ready merged copy runs on that copy (it needs no
   slot and does not count toward ``max_loras``) until it finishes or is preempted.

Each scheduled sequence carries its ``Route`` (server/engine/route.py): base, side path in slot k,
or merged copy c. The output is sorted by ``Route.batch_order``: the engine runs one forward for the
base + side-path batch and one per merged copy, each over a contiguous run of the list.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from server.config import EngineConfig
from server.engine.fairness import AdmissionPolicy, make_policy
from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.route import Route
from server.engine.sampler import SampleOutput, TokenLogprobs
from server.engine.sequence import FinishReason, Sequence, SequenceStatus

STARVATION_STEPS = 32


class MergedCopyLease(Protocol):
    """What a sequence holds while it runs on a merged copy (merging.MergedCopy)."""

    @property
    def index(self) -> int: ...


# The lease types are the implementation's own (adapters/cache.py hands out its entries): the
# scheduler only keeps a lease on its sequence and hands it back, so each protocol is generic in it.
LeaseT = TypeVar("LeaseT")
CopyT = TypeVar("CopyT", bound=MergedCopyLease)


class AdapterSlots(Protocol[LeaseT]):
    """What the scheduler needs of the adapter cache (adapters/cache.py implements it)."""

    def try_activate(self, adapter_id: str) -> int | None:
        """The adapter's device slot, making it resident if that can be done now; else None."""

    def acquire(self, adapter_id: str) -> LeaseT:
        """A running sequence uses it: never evict it until the lease is released."""

    def lease_slot(self, lease: LeaseT) -> int:
        """The slot the leased adapter version occupies."""

    def release(self, lease: LeaseT) -> None: ...


class MergedCopies(Protocol[CopyT]):
    """What the scheduler needs of the merged copies (server/engine/merging.py implements it)."""

    def route(self, adapter_id: str | None) -> CopyT | None:
        """A lease on a ready merged copy of this adapter, or None (side path)."""

    def release(self, copy: CopyT) -> None: ...


class NoMergedCopies:
    def route(self, adapter_id: str | None) -> None:
        return None

    def release(self, copy: MergedCopyLease) -> None:
        raise AssertionError("no merged copy was handed out")


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens
    route: Route  # base, side path in a slot, or a merged copy
    samples: bool  # this step feeds the last uncomputed token, so it produces the next one

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int, route: Route) -> ScheduledSeq:
        samples = seq.num_computed_tokens + num_new_tokens == seq.num_tokens
        return cls(seq, num_new_tokens, route, samples)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # ordered by Route.batch_order: each forward's and slot's tokens contiguous
    num_waiting: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler(Generic[LeaseT, CopyT]):
    def __init__(
        self,
        config: EngineConfig,
        kv_cache: KVCache,
        slots: AdapterSlots[LeaseT],
        max_model_len: int,
        eos_token_ids: frozenset[int],
        merged: MergedCopies[CopyT] | None = None,
    ) -> None:
        self.config = config
        self.merged: MergedCopies[CopyT] = merged or NoMergedCopies()
        self.eos_token_ids = eos_token_ids
        self.kv_cache = kv_cache
        self.slots = slots
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by arrival_index
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        enabled = config.prefix_caching == "on"
        self.prefix = PrefixCache(kv_cache.allocator, kv_cache.block_size, enabled)
        self.fairness: AdmissionPolicy = make_policy(config.scheduling)

    def add(self, seq: Sequence) -> None:
        self.fairness.arrived(seq)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival_index)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        budget = self._schedule_running(scheduled, budget)
        self._admit_waiting(scheduled, budget)
        scheduled.sort(key=lambda s: s.route.batch_order)
        return SchedulerOutput(scheduled=scheduled, num_waiting=len(self.waiting))

    def _schedule_running(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        order = sorted(self.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.arrival_index))
        for seq in order:
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve_or_preempt(seq, num_new, scheduled):
                continue
            self._append(scheduled, ScheduledSeq.of(seq, num_new, self._route(seq)))
            budget -= num_new
        return budget

    def _append(self, scheduled: list[ScheduledSeq], item: ScheduledSeq) -> None:
        """Schedule ``item`` and charge its tenant now, so the admissions after it see the charge."""
        self.fairness.charge(item.seq, item.samples)
        scheduled.append(item)

    def _reserve_or_preempt(self, seq: Sequence, num_new: int, scheduled: list[ScheduledSeq]) -> bool:
        """Reserve KV blocks for seq, preempting the newest running sequences not scheduled yet this
        step, seq itself included: an older sequence never loses its blocks to a newer one (False:
        seq itself was preempted)."""
        taken = {s.seq for s in scheduled}
        while not self._reserve(seq, num_new):
            victim = max((s for s in self.running if s not in taken), key=lambda s: s.arrival_index)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> None:
        adapters = {
            s.adapter_id for s in self.running if s.adapter_lease is not None and s.adapter_id is not None
        }
        for seq in self.fairness.order(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            route = self._admissible_route(seq, adapters)
            if route is None:
                seq.num_skipped_steps += 1
                if seq.num_skipped_steps >= STARVATION_STEPS:
                    break  # let the running batch drain until this one fits
                continue
            self.prefix.attach(seq)  # its cached prefix: blocks shared, their prefill skipped
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, num_new):
                self.prefix.detach(seq)
                self._drop_copy(seq)
                break  # out of KV memory: those after it in the admission order must not jump ahead
            self.prefix.count_lookup(seq)
            self._start(seq, adapters)
            self._append(scheduled, ScheduledSeq.of(seq, num_new, route))
            budget -= num_new

    def _admissible_route(self, seq: Sequence, adapters: set[str]) -> Route | None:
        """The route seq would run on, or None when it must wait (adapter limit or still loading).
        A ready merged copy of its adapter is leased here."""
        if seq.adapter_id is None:
            return Route.base()
        copy = seq.merged_copy = self.merged.route(seq.adapter_id)
        if copy is not None:
            return Route.merged(copy.index)
        if seq.adapter_id not in adapters and len(adapters) >= self.config.max_loras:
            return None
        slot = self.slots.try_activate(seq.adapter_id)
        return None if slot is None else Route.side(slot)

    def _start(self, seq: Sequence, adapters: set[str]) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        seq.num_skipped_steps = 0
        if seq.adapter_id is not None and seq.merged_copy is None:
            seq.adapter_lease = self.slots.acquire(seq.adapter_id)
            adapters.add(seq.adapter_id)

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        needed = self.kv_cache.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.kv_cache.allocator.num_free:
            return False
        seq.block_table.extend(self.kv_cache.allocator.allocate(needed))
        return True

    def _drop_copy(self, seq: Sequence) -> None:
        copy = self._copy_of(seq)
        if copy is not None:
            self.merged.release(copy)
            seq.merged_copy = None

    def _route(self, seq: Sequence) -> Route:
        """The route of a running sequence: where its lease or merged copy put it at admission."""
        copy = self._copy_of(seq)
        if copy is not None:
            return Route.merged(copy.index)
        lease = self._lease_of(seq)
        if lease is not None:
            return Route.side(self.slots.lease_slot(lease))
        return Route.base()

    # A Sequence keeps its leases untyped (it is not generic in the cache's types); only this
    # scheduler sets them, from self.slots.acquire and self.merged.route, so these casts hold.
    def _lease_of(self, seq: Sequence) -> LeaseT | None:
        return cast("LeaseT | None", seq.adapter_lease)

    def _copy_of(self, seq: Sequence) -> CopyT | None:
        return cast("CopyT | None", seq.merged_copy)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's KV and queue it again; it is recomputed from prompt + outputs so far."""
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            lease = self._lease_of(seq)
            if lease is not None:
                self.slots.release(lease)
                seq.adapter_lease = None
            self._drop_copy(seq)
        self.kv_cache.allocator.free(seq.block_table)  # cached blocks stay cached until evicted
        seq.block_table = []
        seq.num_published_blocks = 0

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        self.fairness.left(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def postprocess(
        self,
        out: SchedulerOutput,
        sampled: SampleOutput,
        prompt_logprobs: Mapping[Sequence, TokenLogprobs] | None = None,
    ) -> None:
        """Advance every scheduled sequence: the prompt tokens scored this step are recorded, sampled
        ones get their token (with its logprobs) and stop checks, and one that asked for no token
        (max_tokens 0) ends once its prompt is computed, its sampled token dropped."""
        for seq, scores in (prompt_logprobs or {}).items():
            seq.prompt_logprobs.extend(scores.logprobs)
            seq.prompt_top_logprobs.extend(scores.top_logprobs)
        rows = iter(zip(sampled.token_ids, sampled.logprobs, sampled.top_logprobs, strict=True))
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.status is SequenceStatus.RUNNING:
                self.prefix.publish(seq)  # blocks it filled this step serve later prefixes
            if not item.samples:
                continue
            token, logprob, top = next(rows)
            if seq.is_finished:
                continue
            if seq.sampling.max_tokens == 0:
                self.finish(seq, FinishReason.LENGTH)
                continue
            seq.output_token_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.output_top_logprobs.append(top)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.sampling
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if seq.grammar is not None and seq.grammar.is_terminated:  # ended with EOS, also under ignore_eos
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
