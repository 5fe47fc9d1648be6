"""The admission policies alone: a real Scheduler on the fake adapter slots of test_scheduler.py.

Service is counted here from what each step scheduled, independently of the policy's counters: a
sequence's prompt when it is first scheduled (weight PREFILL_WEIGHT), each token sampled
(DECODE_WEIGHT), divided by its tenant's weight.
"""

from __future__ import annotations

from collections import Counter

import pytest

from server.engine.fairness import DECODE_WEIGHT, PREFILL_WEIGHT, FcfsPolicy, VirtualTokenCounter
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, Sequence
from tests.engine.test_scheduler import FakeSlots, add, make_scheduler, make_seq, names, step

PROMPT_LEN, MAX_TOKENS, NUM_SEATS = 4, 8, 4
SERVICE_PER_REQUEST = PREFILL_WEIGHT * PROMPT_LEN + DECODE_WEIGHT * MAX_TOKENS


class Arrivals:
    """Sequences of named tenants with increasing arrival indices."""

    def __init__(self) -> None:
        self.next_index = 0
        self.seqs: list[Sequence] = []

    def make(self, tenant: str, count: int = 1, **options: object) -> list[Sequence]:
        made = []
        for _ in range(count):
            seq = seq_of(tenant, self.next_index, **options)
            self.next_index += 1
            made.append(seq)
        self.seqs += made
        return made


def seq_of(tenant: str, arrival: int, priority: int = 0, prompt_len: int = PROMPT_LEN,
           max_tokens: int = MAX_TOKENS, adapter: str | None = None) -> Sequence:  # fmt: skip
    seq = make_seq(
        f"{tenant}{arrival}", arrival, prompt_len=prompt_len, adapter=adapter, max_tokens=max_tokens
    )
    seq.tenant, seq.priority = tenant, priority
    return seq


def served(out: SchedulerOutput, weights: dict[str, float] | None = None) -> Counter[str]:
    """The weighted service each tenant got in one step (call before the step's postprocess has
    been applied to the counts, i.e. from the output's own items)."""
    service: Counter[str] = Counter()
    for item in out.scheduled:
        seq = item.seq
        first = seq.num_computed_tokens == item.num_new_tokens and not seq.num_preemptions
        amount = PREFILL_WEIGHT * len(seq.prompt_token_ids) * first + DECODE_WEIGHT * item.samples
        service[seq.tenant] += amount / (weights or {}).get(seq.tenant, 1.0)
    return service


def scheduler(policy: str = "fair", **config: int) -> Scheduler:
    return make_scheduler(scheduling=policy, max_num_seqs=NUM_SEATS, **config)


def backlogged(sched: Scheduler, *tenants: str) -> bool:
    waiting = {s.tenant for s in sched.waiting}
    return all(t in waiting for t in tenants)


def run_while_backlogged(sched: Scheduler, *tenants: str, weights: dict[str, float] | None = None,
                         max_steps: int = 2000) -> list[Counter[str]]:  # fmt: skip
    """Cumulative weighted service after each step, while every tenant still has sequences waiting."""
    total: Counter[str] = Counter()
    history = []
    while backlogged(sched, *tenants):
        total += served(step(sched), weights)
        history.append(Counter(total))
        assert len(history) < max_steps
    return history


@pytest.mark.parametrize("a_first", [True, False])
def test_service_difference_between_two_backlogged_tenants_stays_bounded(a_first):
    """VTC's guarantee without preemption: while both wait, neither is ahead by more than the seats'
    worth of requests plus one; first come first served lets the first tenant's backlog run away."""
    arrivals = Arrivals()
    first, second = ("a", "b") if a_first else ("b", "a")
    bound = (NUM_SEATS + 1) * SERVICE_PER_REQUEST
    for policy in ("fair", "fcfs"):
        sched = scheduler(policy)
        add(sched, *arrivals.make(first, 60), *arrivals.make(second, 60))
        history = run_while_backlogged(sched, "a", "b")
        gaps = [abs(total["a"] - total["b"]) for total in history]
        if policy == "fair":
            assert max(gaps) <= bound and len(history) > 50
        else:
            assert max(gaps) > 3 * bound  # the test can tell the policies apart


def test_a_tenant_joining_a_flood_is_served_before_the_flood_drains():
    """B's three requests, sent while A has forty queued, are all admitted while A still waits."""
    for policy, b_admitted_early in (("fair", True), ("fcfs", False)):
        arrivals = Arrivals()
        sched = scheduler(policy)
        add(sched, *arrivals.make("a", 40))
        for _ in range(5):
            step(sched)
        add(sched, *arrivals.make("b", 3))
        while any(s.tenant == "b" for s in sched.waiting):
            step(sched)
        a_waiting = sum(s.tenant == "a" for s in sched.waiting)
        assert (a_waiting >= 30) is b_admitted_early, policy


def test_weights_share_the_service_in_their_ratio():
    """Weight 3 against 1: while both are backlogged, A gets three times B's raw service (±1 request)."""
    weights = {"a": 3.0, "b": 1.0}
    sched = scheduler()
    sched.fairness.set_weights(weights)
    arrivals = Arrivals()
    add(sched, *arrivals.make("b", 100), *arrivals.make("a", 200))
    raw = run_while_backlogged(sched, "a", "b")[-1]
    weighted = [t["a"] / 3 - t["b"] for t in run_while_backlogged(sched, "a", "b", weights=weights)]
    assert raw["a"] / raw["b"] == pytest.approx(3.0, rel=0.15)
    assert all(abs(gap) <= (NUM_SEATS + 1) * SERVICE_PER_REQUEST for gap in weighted)


def test_an_idle_tenant_banks_no_credit():
    """B returns after A ran alone for a long while: B's counter is lifted to A's, so the two share
    from then on instead of B taking the server until it has caught up."""
    sched = scheduler()
    arrivals = Arrivals()
    add(sched, *arrivals.make("b", 1))
    add(sched, *arrivals.make("a", 200))
    for _ in range(200):
        step(sched)
    policy = sched.fairness
    assert isinstance(policy, VirtualTokenCounter)
    assert not any(s.tenant == "b" for s in (*sched.waiting, *sched.running))
    add(sched, *arrivals.make("b", 40))
    assert policy.counters["b"] == min(policy.counters["a"], policy.counters["b"]) == policy.counters["a"]
    total: Counter[str] = Counter()
    for _ in range(60):
        total += served(step(sched))
    assert total["a"] > 0.3 * total["b"]  # A keeps a fair part: B has no banked credit to spend


def test_a_tenant_alone_gets_every_seat():
    """Work-conserving: with no one else waiting, one tenant fills the batch."""
    sched = scheduler()
    add(sched, *Arrivals().make("a", 10))
    assert len(step(sched).scheduled) == NUM_SEATS


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_priority_orders_a_tenants_own_requests_only(policy):
    """A's priority -5 request goes before A's earlier ones, never before B's that arrived first."""
    sched = make_scheduler(scheduling=policy, max_num_seqs=1)
    b0, a1, a2 = seq_of("b", 0), seq_of("a", 1), seq_of("a", 2, priority=-5)
    a3 = seq_of("a", 3, priority=5)
    add(sched, a1, a3, b0, a2)
    order = [names(step(sched))[0] for _ in range(MAX_TOKENS * 4) if sched.has_work]
    firsts = list(dict.fromkeys(order))
    assert firsts[0] == "b0" and firsts.index("a2") < firsts.index("a1") < firsts.index("a3")


def test_fcfs_policy_keeps_arrival_order_across_tenants():
    arrivals = Arrivals()
    seqs = arrivals.make("a", 2) + arrivals.make("b", 2) + arrivals.make("a", 1)
    assert list(FcfsPolicy().order(seqs)) == seqs


def test_a_sequence_skipped_for_its_adapter_does_not_hold_back_the_others():
    """Composes with the adapter limit: B's head waits for its adapter to load, A is admitted."""
    slots = FakeSlots()  # "x" not resident: loading
    sched = make_scheduler(slots=slots, max_num_seqs=2)
    add(sched, seq_of("b", 0, adapter="x"), seq_of("a", 1), seq_of("a", 2))
    assert names(step(sched)) == ["a1", "a2"]
    slots.resident["x"] = 0
    sched.finish(sched.running[0], FinishReason.ABORT)
    assert "b0" in names(step(sched))


def test_preempted_sequences_are_not_charged_twice():
    """A sequence recomputed after preemption is not charged its prompt again."""
    sched = make_scheduler(num_blocks=6, max_num_seqs=3)
    seqs = [seq_of(t, i, prompt_len=4) for i, t in enumerate("abc")]
    add(sched, *seqs)
    for _ in range(3):
        step(sched)
    assert sched.num_preemptions > 0
    service = sched.fairness.service()
    assert {t: s.prompt_tokens for t, s in service.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(s.num_admitted == 1 for s in service.values())


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="positive"):
        VirtualTokenCounter().set_weights({"a": 0.0})


def test_fair_order_costs_no_steps():
    """Work-conserving: the flood and the small tenant's requests drain in as many steps, and as
    many full batches, under either policy; only the order differs."""
    runs = {}
    for policy in ("fair", "fcfs"):
        arrivals = Arrivals()
        sched = scheduler(policy)
        add(sched, *arrivals.make("a", 40))
        outs = [step(sched) for _ in range(3)]
        add(sched, *arrivals.make("b", 3, max_tokens=2))
        while sched.has_work:
            outs.append(step(sched))
        runs[policy] = (len(outs), sum(len(out.scheduled) == NUM_SEATS for out in outs))
    assert runs["fair"] == runs["fcfs"]


def test_the_engine_core_queues_each_request_with_its_tenant_and_priority(tiny_llama):
    """Through EngineCore.add_request on a real model: one seat, tenant a's priority -1 request runs
    before its earlier priority 0 one, and tenant b's first request goes between a's (fair share)."""
    from server.engine.sampler import SamplingParams
    from tests.engine.tiny import make_core

    core = make_core(tiny_llama, max_num_seqs=1)
    for request_id, tenant, priority in (("a-late", "a", 0), ("a-urgent", "a", -1), ("b", "b", 0)):
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
        core.add_request(request_id, [256, 1, 2], params, None, tenant=tenant, priority=priority)
    started: list[str] = []
    while core.has_work:
        for delta in core.step():
            if delta.request_id not in started:
                started.append(delta.request_id)
    assert started == ["a-urgent", "b", "a-late"]
