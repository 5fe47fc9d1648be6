"""The scheduler alone: admission order, token and KV budgets, adapter limits, routes and stops.

No model: a real ``Scheduler`` over a real (tiny, CPU) ``KVCache``, real ``Sequence`` objects, and
fakes for the adapter slots and merged copies that the test controls and that count every lease.
Blocks hold ``BLOCK_SIZE`` = 2 tokens, so ``n`` tokens need ``ceil(n / 2)`` blocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from server.config import EngineConfig
from server.engine.kv_cache import KVCache
from server.engine.route import Route, RouteKind
from server.engine.sampler import SampleOutput, SamplingParams
from server.engine.scheduler import STARVATION_STEPS, Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, Sequence, SequenceStatus

BLOCK_SIZE = 2
EOS = 99
TOKEN = 7  # what every sampled row gets unless a test says otherwise (neither EOS nor a stop token)
TINY_MODEL = SimpleNamespace(num_key_value_heads=1, hidden_size=1, num_attention_heads=1, num_hidden_layers=1)


@dataclass(eq=False)
class Lease:
    adapter_id: str
    slot: int
    released: bool = False


class FakeSlots:
    """AdapterSlots: ``resident`` maps adapter → slot; an adapter missing from it is still loading."""

    def __init__(self, resident: dict[str, int] | None = None) -> None:
        self.resident = dict(resident or {})
        self.activations: Counter[str] = Counter()
        self.acquired: Counter[str] = Counter()
        self.released: Counter[str] = Counter()

    def try_activate(self, adapter_id: str) -> int | None:
        self.activations[adapter_id] += 1
        return self.resident.get(adapter_id)

    def acquire(self, adapter_id: str) -> Lease:
        self.acquired[adapter_id] += 1
        return Lease(adapter_id, self.resident[adapter_id])

    def lease_slot(self, lease: Lease) -> int:
        return lease.slot

    def release(self, lease: Lease) -> None:
        assert not lease.released, f"lease on {lease.adapter_id} released twice"
        lease.released = True
        self.released[lease.adapter_id] += 1


@dataclass(eq=False)
class CopyLease:
    adapter_id: str
    index: int
    released: bool = False


class FakeMerged:
    """MergedCopies: ``ready`` maps adapter → merged copy index."""

    def __init__(self, ready: dict[str, int]) -> None:
        self.ready = dict(ready)
        self.leased: Counter[str] = Counter()
        self.released: Counter[str] = Counter()

    def route(self, adapter_id: str | None) -> CopyLease | None:
        if adapter_id not in self.ready:
            return None
        self.leased[adapter_id] += 1
        return CopyLease(adapter_id, self.ready[adapter_id])

    def release(self, copy: CopyLease) -> None:
        assert not copy.released, f"merged copy of {copy.adapter_id} released twice"
        copy.released = True
        self.released[copy.adapter_id] += 1


def make_scheduler(
    *,
    num_blocks: int = 64,
    max_model_len: int = 256,
    slots: FakeSlots | None = None,
    merged: FakeMerged | None = None,
    **config: int,
) -> Scheduler:
    settings = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_loras": 4, **config}
    kv = KVCache(TINY_MODEL, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    return Scheduler(
        EngineConfig(**settings), kv, slots or FakeSlots(), max_model_len, frozenset({EOS}), merged
    )


def make_seq(
    name: str, arrival: int, prompt_len: int = 2, adapter: str | None = None, **sampling: object
) -> Sequence:
    params = SamplingParams(**{"max_tokens": 100, **sampling})
    return Sequence(name, [TOKEN] * prompt_len, params, adapter, arrival)


def add(sched: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        sched.add(seq)


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> SchedulerOutput:
    """One engine step: schedule, then sample ``tokens[request_id]`` (default TOKEN) per sampled row."""
    out = sched.schedule()
    token_ids = [(tokens or {}).get(s.seq.request_id, TOKEN) for s in out.scheduled if s.samples]
    sched.postprocess(out, SampleOutput(token_ids, [-0.5] * len(token_ids), [()] * len(token_ids)))
    return out


def fed(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def names(out: SchedulerOutput) -> list[str]:
    return [s.seq.request_id for s in out.scheduled]


def routes(out: SchedulerOutput) -> list[Route]:
    return [s.route for s in out.scheduled]


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def run_to_completion(sched: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work:
        outs.append(step(sched))
        assert len(outs) < max_steps
    return outs


# --- admission order -------------------------------------------------------------------------------


def test_waiting_sequences_are_admitted_first_come_first_served():
    """Admission follows arrival_index, not the order add() was called in."""
    sched = make_scheduler(max_num_seqs=2)
    add(sched, make_seq("r2", 2), make_seq("r0", 0), make_seq("r1", 1))
    out = step(sched)
    assert names(out) == ["r0", "r1"]
    assert ids(sched.waiting) == ["r2"] and out.num_waiting == 1


def three_full_sequences() -> tuple[Scheduler, list[Sequence]]:
    """A, B, C with 4-token prompts fill all 6 blocks; each has sampled one token (5 tokens now)."""
    sched = make_scheduler(num_blocks=6)
    seqs = [make_seq(name, i, prompt_len=4) for i, name in enumerate("ABC")]
    add(sched, *seqs)
    assert fed(step(sched)) == [("A", 4), ("B", 4), ("C", 4)]
    assert sched.kv_cache.allocator.num_free == 0
    return sched, seqs


def test_preempted_sequence_is_requeued_at_its_arrival_place():
    """A preempted sequence goes back ahead of later arrivals and is admitted before them."""
    sched, (a, b, _) = three_full_sequences()
    d = make_seq("D", 3, prompt_len=2)
    sched.add(d)
    step(sched)  # A's decode needs a third block: C is preempted
    assert ids(sched.waiting) == ["C", "D"]
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    assert fed(step(sched)) == [("C", 5), ("D", 2)]


# --- budgets ----------------------------------------------------------------------------------------


def test_decodes_are_scheduled_before_prefills():
    """A decoding sequence gets its token before an older sequence's prefill chunk takes the rest."""
    slots = FakeSlots()  # "x" still loading, so older A is admitted after newer B
    sched = make_scheduler(slots=slots, max_num_seqs=2, max_num_batched_tokens=4)
    add(sched, make_seq("A", 0, prompt_len=10, adapter="x"), make_seq("B", 1, prompt_len=2))
    assert fed(step(sched)) == [("B", 2)]
    slots.resident["x"] = 0
    assert fed(step(sched)) == [("B", 1), ("A", 3)]
    assert fed(step(sched)) == [("B", 1), ("A", 3)]  # arrival order would give A 4, B nothing


def test_long_prompt_is_prefilled_in_chunks():
    """A prompt longer than max_num_batched_tokens is fed over several steps; only the last samples."""
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=4)
    seq = make_seq("long", 0, prompt_len=10)
    sched.add(seq)
    trace = []
    for _ in range(4):
        (item,) = step(sched).scheduled
        trace.append((item.num_new_tokens, item.samples, seq.num_computed_tokens, len(seq.output_token_ids)))
    assert trace == [(4, False, 4, 0), (4, False, 8, 0), (2, True, 10, 1), (1, True, 11, 2)]
    assert len(seq.block_table) == 6  # 11 computed tokens + the pending one fill 6 blocks of 2


def test_token_budget_is_shared_by_decodes_prefill_chunks_and_admissions():
    """Each step feeds exactly what fits in max_num_batched_tokens, in the documented order."""
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=8)
    add(sched, *(make_seq(f"r{i}", i, prompt_len=5, max_tokens=2, ignore_eos=True) for i in range(4)))
    assert [fed(out) for out in run_to_completion(sched)] == [
        [("r0", 5), ("r1", 3)],
        [("r0", 1), ("r1", 2), ("r2", 5)],
        [("r1", 1), ("r2", 1), ("r3", 5)],
        [("r3", 1)],
    ]


@pytest.mark.parametrize(("max_num_seqs", "budget"), [(1, 4), (2, 4), (2, 7), (4, 16)])
def test_budgets_hold_at_every_step(max_num_seqs, budget):
    """Tokens per step never exceed the budget, running sequences never exceed max_num_seqs."""
    sched = make_scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [make_seq(f"r{i}", i, n, max_tokens=3, ignore_eos=True) for i, n in enumerate([1, 9, 3, 12, 2, 6])]
    add(sched, *seqs)
    while sched.has_work:
        out = step(sched)
        assert sum(n for _, n in fed(out)) <= budget
        assert len(out.scheduled) <= max_num_seqs and len(sched.running) <= max_num_seqs
    assert [len(s.output_token_ids) for s in seqs] == [3] * 6
    assert {s.finish_reason for s in seqs} == {FinishReason.LENGTH}


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_max_num_seqs_caps_the_running_batch(max_num_seqs):
    """With tokens to spare, admission stops at max_num_seqs running sequences."""
    sched = make_scheduler(max_num_seqs=max_num_seqs)
    add(sched, *(make_seq(f"r{i}", i) for i in range(5)))
    assert names(step(sched)) == [f"r{i}" for i in range(max_num_seqs)]
    assert names(step(sched)) == [f"r{i}" for i in range(max_num_seqs)]  # still full: decodes only
    assert len(sched.waiting) == 5 - max_num_seqs


# --- KV exhaustion ----------------------------------------------------------------------------------


def test_kv_exhaustion_preempts_the_newest_running_sequence():
    """Out of blocks, the newest running sequence loses its KV and is queued again for recompute."""
    sched, (a, b, c) = three_full_sequences()
    out = step(sched)
    assert fed(out) == [("A", 1), ("B", 1)]
    assert c.status is SequenceStatus.WAITING and sched.waiting == [c]
    assert (c.block_table, c.num_computed_tokens, c.output_token_ids) == ([], 0, [TOKEN])
    assert (c.num_preemptions, sched.num_preemptions) == (1, 1)
    assert (len(a.block_table), len(b.block_table), sched.kv_cache.allocator.num_free) == (3, 3, 0)
    assert c.num_uncomputed_tokens == 5  # prompt + the token sampled before preemption


def test_waiting_sequence_that_does_not_fit_blocks_later_arrivals():
    """A waiting sequence without enough free blocks stops admission: smaller later ones wait too."""
    sched = make_scheduler(num_blocks=4)
    running = make_seq("R", 0, prompt_len=3)
    sched.add(running)
    step(sched)
    add(sched, make_seq("W1", 1, prompt_len=6), make_seq("W2", 2, prompt_len=2))
    assert names(step(sched)) == ["R"]
    assert ids(sched.waiting) == ["W1", "W2"] and sched.kv_cache.allocator.num_free == 2
    sched.finish(running, FinishReason.ABORT)
    assert fed(step(sched)) == [("W1", 6), ("W2", 2)]


def test_kv_exhaustion_never_preempts_an_older_sequence_for_a_newer_one():
    """When the newest running sequence is the one that needs a block, it is the one preempted."""
    slots = FakeSlots()  # "x" still loading, so older A starts its prefill after newer B
    sched = make_scheduler(num_blocks=4, slots=slots, max_num_seqs=2, max_num_batched_tokens=4)
    a, b = make_seq("A", 0, prompt_len=8, adapter="x"), make_seq("B", 1, prompt_len=3)
    add(sched, a, b)
    assert fed(step(sched)) == [("B", 3)]
    slots.resident["x"] = 0
    assert fed(step(sched)) == [("B", 1), ("A", 3)]  # all 4 blocks in use now
    step(sched)  # B's decode needs a third block
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)


# --- adapters: max_loras, loading, starvation -------------------------------------------------------


def test_max_loras_skips_only_sequences_that_would_add_an_adapter():
    """At most max_loras side-path adapters run; base and already-running adapters still get in."""
    slots = FakeSlots({"x": 0, "y": 1, "z": 2})
    sched = make_scheduler(slots=slots, max_loras=2)
    adapters = ["x", "y", "z", None, "x", "z"]
    seqs = [make_seq(f"s{i}", i, adapter=adapter) for i, adapter in enumerate(adapters)]
    add(sched, *seqs)
    out = step(sched)
    assert names(out) == ["s3", "s0", "s4", "s1"]
    assert routes(out) == [Route.base(), Route.side(0), Route.side(0), Route.side(1)]
    assert ids(sched.waiting) == ["s2", "s5"] and [s.num_skipped_steps for s in sched.waiting] == [1, 1]
    assert (slots.acquired, slots.activations["z"]) == (Counter({"x": 2, "y": 1}), 0)
    sched.finish(seqs[1], FinishReason.ABORT)  # y leaves: room for z
    out = step(sched)
    assert names(out) == ["s3", "s0", "s4", "s2", "s5"]
    assert {s.adapter_id for s in sched.running if s.adapter_lease is not None} == {"x", "z"}


def test_loading_adapter_is_skipped_without_blocking_then_admitted():
    """try_activate returning None leaves the sequence waiting; others pass it; it runs once resident."""
    slots = FakeSlots({"y": 1})
    sched = make_scheduler(slots=slots)
    cold = make_seq("cold", 0, prompt_len=3, adapter="x")
    add(sched, cold, make_seq("base", 1), make_seq("warm", 2, adapter="y"))
    assert names(step(sched)) == ["base", "warm"]
    assert names(step(sched)) == ["base", "warm"]
    assert (cold.num_skipped_steps, slots.activations["x"], slots.acquired["x"]) == (2, 2, 0)
    slots.resident["x"] = 3
    out = step(sched)
    assert fed(out) == [("base", 1), ("warm", 1), ("cold", 3)] and out.scheduled[2].route == Route.side(3)
    assert (cold.num_skipped_steps, slots.acquired["x"]) == (0, 1)


def starving_setup(cause: str) -> tuple[Scheduler, Sequence, Callable[[], None]]:
    """S waits on adapter x, blocked by ``cause``; returns the scheduler, S and how to unblock it."""
    slots = FakeSlots() if cause == "loading" else FakeSlots({"x": 0, "y": 1})
    sched = make_scheduler(slots=slots, max_loras=4 if cause == "loading" else 1)
    holder = make_seq("R", -1, prompt_len=1, adapter="y", ignore_eos=True)  # holds the only lora slot
    if cause == "max_loras":
        sched.add(holder)
    starving = make_seq("S", 0, prompt_len=1, adapter="x")
    sched.add(starving)

    def unblock() -> None:
        if cause == "loading":
            slots.resident["x"] = 0
        else:
            sched.finish(holder, FinishReason.ABORT)

    return sched, starving, unblock


@pytest.mark.parametrize("cause", ["loading", "max_loras"])
def test_starving_sequence_stops_admission_behind_it_until_it_gets_in(cause):
    """After STARVATION_STEPS skips nothing behind S is admitted (the batch drains), then S runs."""
    sched, starving, unblock = starving_setup(cause)
    admitted = []
    for i in range(1, STARVATION_STEPS + 1):
        sched.add(make_seq(f"b{i}", 100 + i, prompt_len=1, max_tokens=1))  # runs one step
        admitted.append([name for name in names(step(sched)) if name.startswith("b")])
    assert admitted == [[f"b{i}"] for i in range(1, STARVATION_STEPS)] + [[]]
    assert starving.num_skipped_steps == STARVATION_STEPS
    assert names(step(sched)) == ([] if cause == "loading" else ["R"])
    assert ids(sched.waiting) == ["S", f"b{STARVATION_STEPS}"]
    unblock()
    assert names(step(sched)) == [f"b{STARVATION_STEPS}", "S"]
    assert starving.num_skipped_steps == 0 and starving.status is SequenceStatus.RUNNING


# --- merged copies and batch order -------------------------------------------------------------------


def test_merged_copy_route_needs_no_slot_and_no_lora_budget():
    """A ready merged copy gives a MERGED route: no try_activate, no acquire, no max_loras share."""
    slots, merged = FakeSlots({"y": 0, "z": 1}), FakeMerged({"x": 2})
    sched = make_scheduler(slots=slots, merged=merged, max_loras=1)
    add(sched, *(make_seq(f"s{a}", i, adapter=a) for i, a in enumerate(["x", "y", "z"])))
    out = step(sched)
    assert names(out) == ["sy", "sx"] and routes(out) == [Route.side(0), Route.merged(2)]
    assert out.scheduled[1].route.kind is RouteKind.MERGED and out.scheduled[1].seq.adapter_lease is None
    assert ids(sched.waiting) == ["sz"]  # y holds the only lora slot; x's copy did not use it
    assert (slots.activations["x"], slots.acquired, merged.leased) == (0, Counter(y=1), Counter(x=1))
    assert routes(step(sched)) == [Route.side(0), Route.merged(2)]  # kept while running
    assert merged.leased == Counter(x=1)


def test_batch_order_is_base_then_side_by_slot_then_merged_copies():
    """out.scheduled runs base, side path slot by slot, then each merged copy, whatever the arrival."""
    slots, merged = FakeSlots({"a": 2, "b": 0}), FakeMerged({"hot1": 1, "hot0": 0})
    sched = make_scheduler(slots=slots, merged=merged)
    adapters = ["hot1", "hot0", "a", "b", None, "a"]
    add(sched, *(make_seq(f"s{i}", i, adapter=adapter) for i, adapter in enumerate(adapters)))
    expected = ["s4", "s3", "s2", "s5", "s1", "s0"]
    expected_routes = [Route.base(), Route.side(0), Route.side(2), Route.side(2)]
    for _ in range(2):  # admission step, then a decode step of the running batch
        out = step(sched)
        assert names(out) == expected
        assert routes(out) == [*expected_routes, Route.merged(0), Route.merged(1)]


def test_merged_copy_lease_is_dropped_when_admission_runs_out_of_kv():
    """A copy leased for a sequence that then does not fit in KV is released, not leaked."""
    merged = FakeMerged({"x": 0})
    sched = make_scheduler(num_blocks=2, merged=merged)
    seq = make_seq("big", 0, prompt_len=6, adapter="x")
    sched.add(seq)
    assert step(sched).is_empty and step(sched).is_empty
    assert (merged.leased, merged.released, seq.merged_copy) == (Counter(x=2), Counter(x=2), None)


# --- routes and leases --------------------------------------------------------------------------------


def test_routes_base_for_no_adapter_side_with_the_pool_slot():
    """Adapter None runs BASE; an adapter runs SIDE in the slot the pool gave, leased once."""
    slots = FakeSlots({"x": 5})
    sched = make_scheduler(slots=slots)
    add(sched, make_seq("base", 0), make_seq("lora", 1, adapter="x"))
    for _ in range(3):
        base, lora = step(sched).scheduled
        assert (base.route.kind, base.route.slot, base.route.copy) == (RouteKind.BASE, None, None)
        assert (lora.route.kind, lora.route.slot, lora.route.copy) == (RouteKind.SIDE, 5, None)
    assert (slots.activations, slots.acquired, slots.released) == (Counter(x=1), Counter(x=1), Counter())
    lease = sched.running[1].adapter_lease
    assert (lease.adapter_id, lease.slot, lease.released) == ("x", 5, False)


def end_b(sched: Scheduler, b: Sequence, how: str) -> None:
    """Step 1 admits A and B (4 blocks in all); then B ends by ``how``."""
    step(sched, {"B": EOS} if how == "eos" else None)
    if how == "abort":
        sched.finish(b, FinishReason.ABORT)
    if how == "preempt":  # A's decode needs a fifth block: B, the newest, is preempted
        assert names(step(sched)) == ["A"]


@pytest.mark.parametrize("how", ["eos", "abort", "preempt"])
@pytest.mark.parametrize("kind", ["side", "merged"])
def test_leases_are_released_exactly_once(kind, how):
    """B's slot lease or merged copy is released once when it finishes, is aborted or preempted."""
    slots, merged = FakeSlots({"x": 0, "y": 1}), FakeMerged({"y": 3} if kind == "merged" else {})
    sched = make_scheduler(num_blocks=4, slots=slots, merged=merged)
    a, b = make_seq("A", 0, 4, adapter="x"), make_seq("B", 1, 4, adapter="y")
    add(sched, a, b)
    end_b(sched, b, how)
    sched.finish(b, FinishReason.ABORT)  # again, or after a preemption: nothing more to release
    side_b = Counter(y=1) if kind == "side" else Counter()
    assert (slots.acquired, slots.released) == (Counter(x=1) + side_b, side_b)
    # a preempted B leases the copy again when it tries to get back in, and drops it (no KV)
    copies_b = Counter() if kind == "side" else Counter(y=2 if how == "preempt" else 1)
    assert (merged.leased, merged.released) == (copies_b, copies_b)
    assert (b.adapter_lease, b.merged_copy, b.block_table) == (None, None, [])
    assert a.adapter_lease is not None and not a.adapter_lease.released
    assert b.finish_reason is (FinishReason.STOP if how == "eos" else FinishReason.ABORT)


def test_preempted_sequence_takes_a_new_lease_when_readmitted():
    """Preemption releases the lease; readmission acquires a fresh one (acquire and release balance)."""
    slots = FakeSlots({"x": 0, "y": 1})
    sched = make_scheduler(num_blocks=4, slots=slots)
    a, b = make_seq("A", 0, 4, adapter="x", max_tokens=2), make_seq("B", 1, 4, adapter="y")
    add(sched, a, b)
    end_b(sched, b, "preempt")  # A samples its second token, then finishes (max_tokens)
    assert a.finish_reason is FinishReason.LENGTH
    assert fed(step(sched)) == [("B", 5)] and routes(step(sched)) == [Route.side(1)]
    assert (slots.acquired, slots.released) == (Counter(x=1, y=2), Counter(x=1, y=1))


# --- postprocess --------------------------------------------------------------------------------------

STOP_CASES = {  # name: (sampling, max_model_len, sampled tokens, finish reason)
    "eos": ({}, 64, [TOKEN, EOS], FinishReason.STOP),
    "eos-ignored": ({"ignore_eos": True, "max_tokens": 3}, 64, [EOS, EOS, EOS], FinishReason.LENGTH),
    "stop-token": ({"stop_token_ids": (5,), "ignore_eos": True}, 64, [TOKEN, 5], FinishReason.STOP),
    "max-tokens": ({"max_tokens": 2}, 64, [TOKEN, TOKEN], FinishReason.LENGTH),
    "max-model-len": ({}, 5, [TOKEN, TOKEN, TOKEN], FinishReason.LENGTH),
    "running": ({"max_tokens": 3}, 64, [TOKEN, 5], None),
}


@pytest.mark.parametrize(
    ("sampling", "max_model_len", "tokens", "reason"), STOP_CASES.values(), ids=list(STOP_CASES)
)
def test_postprocess_appends_tokens_and_stops(sampling, max_model_len, tokens, reason):
    """Sampled tokens are appended with their logprob; the right stop ends it and frees its KV."""
    sched = make_scheduler(num_blocks=8, max_model_len=max_model_len)
    seq = make_seq("s", 0, prompt_len=2, **sampling)
    sched.add(seq)
    for token in tokens:
        step(sched, {"s": token})
    assert (seq.output_token_ids, seq.output_logprobs) == (tokens, [-0.5] * len(tokens))
    assert seq.finish_reason is reason
    finished = reason is not None
    assert seq.status is (SequenceStatus.FINISHED if finished else SequenceStatus.RUNNING)
    assert (sched.running, seq.block_table == []) == (([] if finished else [seq]), finished)
    assert sched.kv_cache.allocator.num_free == (8 if finished else 6)


def test_postprocess_skips_a_sequence_aborted_after_scheduling():
    """A row aborted between schedule and postprocess consumes its sampled token but gets none."""
    sched = make_scheduler()
    gone, kept = make_seq("gone", 0), make_seq("kept", 1)
    add(sched, gone, kept)
    out = sched.schedule()
    sched.finish(gone, FinishReason.ABORT)
    sched.postprocess(out, SampleOutput([11, 12], [None, None], [(), ()]))
    assert (gone.output_token_ids, kept.output_token_ids) == ([], [12])
    assert gone.finish_reason is FinishReason.ABORT and sched.running == [kept]
