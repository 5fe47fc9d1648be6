"""In which order waiting sequences are offered to admission: fair between tenants, or first come.

The scheduler (server/engine/scheduler.py) asks the policy for its admission order and tells it
what it serves; it keeps every other rule (budgets, adapter slots, KV memory, preemption).

- ``fair`` (the default) is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
  Language Models" (OSDI 2024). Each tenant has a counter of weighted service: a sequence's prompt
  counts ``PREFILL_WEIGHT`` per token when it is first scheduled, each token generated counts
  ``DECODE_WEIGHT``, both divided by the tenant's weight. Admission takes the next sequence of the
  backlogged tenant (one with sequences waiting or running) whose counter is the smallest, and the
  counters move as sequences are admitted, so one step interleaves tenants. A tenant that becomes
  backlogged again after being idle has its counter lifted to the smallest counter among the
  backlogged tenants: idle time banks no credit. The order is work-conserving (every waiting
  sequence is offered), so a tenant alone gets the whole server. Running sequences are never
  preempted for fairness; the service difference between two backlogged tenants stays within
  about ``max_num_seqs`` requests' worth of service.
- ``fcfs`` offers sequences by arrival.

In both, a request's ``priority`` (lower first, as vLLM) orders that tenant's own sequences, ties
by arrival; it never moves a sequence ahead of another tenant's.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from server.engine.sequence import Sequence

PREFILL_WEIGHT = 1.0  # service per prompt token (the paper's w_p)
DECODE_WEIGHT = 2.0  # service per generated token (the paper's w_q): decode steps cost more per token
SCHEDULING_POLICIES = ("fair", "fcfs")


@dataclass(frozen=True)
class TenantService:
    """What one tenant got from the engine since start (cumulative; read by the metrics)."""

    prompt_tokens: int
    generated_tokens: int
    num_admitted: int  # sequences admitted for the first time (a preempted one is not counted again)
    queue_s_sum: float  # arrival in the engine → first admission, summed over those sequences
    virtual_tokens: float  # the fair policy's counter of weighted service (0 under fcfs)


def _own_order(seq: Sequence) -> tuple[int, int]:
    return (seq.priority, seq.arrival_index)


class AdmissionPolicy(Protocol):
    def arrived(self, seq: Sequence) -> None:
        """A new sequence joined the queue (not a preempted one coming back)."""

    def left(self, seq: Sequence) -> None:
        """A sequence that ``arrived`` finished (or was aborted)."""

    def order(self, waiting: list[Sequence]) -> Iterator[Sequence]:
        """``waiting``'s sequences in the order admission should try them; lazy, so what is charged
        while the caller iterates moves the sequences that come next. Iterates over a copy."""

    def charge(self, seq: Sequence, samples: bool) -> None:
        """seq is scheduled this step (``samples``: it produces a token)."""

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Each tenant's share weight (a tenant not named weighs 1)."""

    def service(self) -> dict[str, TenantService]: ...


class _ServiceBook:
    """Counts tokens, admissions and queue time per tenant; both policies keep one."""

    def __init__(self) -> None:
        self.prompt_tokens: Counter[str] = Counter()
        self.generated_tokens: Counter[str] = Counter()
        self.num_admitted: Counter[str] = Counter()
        self.queue_s: defaultdict[str, float] = defaultdict(float)

    def record(self, seq: Sequence, samples: bool) -> tuple[int, int]:
        """(prompt tokens, generated tokens) to charge seq for this step: its whole prompt the first
        time it is scheduled (a preempted sequence's recomputation is not charged again), one token
        per sample that yields one (``max_tokens`` 0 yields none)."""
        prompt = len(seq.prompt_token_ids) if seq.num_computed_tokens == 0 and not seq.num_preemptions else 0
        generated = int(samples and seq.sampling.max_tokens > 0)
        if prompt:
            self.num_admitted[seq.tenant] += 1
            self.queue_s[seq.tenant] += time.monotonic() - seq.arrival_s
        self.prompt_tokens[seq.tenant] += prompt
        self.generated_tokens[seq.tenant] += generated
        return prompt, generated

    def snapshot(self, counters: Mapping[str, float]) -> dict[str, TenantService]:
        """Safe from any thread: each table is copied first (``dict`` of a dict is atomic under the GIL)."""
        prompt, generated = dict(self.prompt_tokens), dict(self.generated_tokens)
        admitted, queue_s = dict(self.num_admitted), dict(self.queue_s)
        return {
            t: TenantService(prompt.get(t, 0), generated.get(t, 0), admitted.get(t, 0), queue_s.get(t, 0.0),
                             counters.get(t, 0.0))
            for t in sorted(set(admitted) | set(counters))
        }  # fmt: skip


class FcfsPolicy:
    """Arrival order; each tenant's own sequences reordered by priority within the places they hold."""

    def __init__(self) -> None:
        self._book = _ServiceBook()

    def arrived(self, seq: Sequence) -> None:
        pass

    def left(self, seq: Sequence) -> None:
        pass

    def order(self, waiting: list[Sequence]) -> Iterator[Sequence]:
        by_priority = _queues(waiting)
        for seq in list(waiting):
            yield by_priority[seq.tenant].popleft()

    def charge(self, seq: Sequence, samples: bool) -> None:
        self._book.record(seq, samples)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        pass  # arrival order knows no shares

    def service(self) -> dict[str, TenantService]:
        return self._book.snapshot({})


class VirtualTokenCounter:
    """The fair policy (see the module docstring)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.counters: dict[str, float] = {}
        self.num_live: Counter[str] = Counter()  # sequences waiting or running, per tenant
        self.weights: dict[str, float] = dict(weights or {})
        self._book = _ServiceBook()

    def arrived(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if not self.num_live[tenant]:
            backlogged = [self.counters.get(t, 0.0) for t, n in self.num_live.items() if n]
            floor = min(backlogged, default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self.num_live[tenant] += 1

    def left(self, seq: Sequence) -> None:
        self.num_live[seq.tenant] -= 1
        if not self.num_live[seq.tenant]:
            del self.num_live[seq.tenant]

    def order(self, waiting: list[Sequence]) -> Iterator[Sequence]:
        queues = _queues(waiting)
        while queues:
            tenant = min(queues, key=lambda t: (self.counters.get(t, 0.0), queues[t][0].arrival_index))
            queue = queues[tenant]
            yield queue.popleft()
            if not queue:
                del queues[tenant]

    def charge(self, seq: Sequence, samples: bool) -> None:
        prompt, generated = self._book.record(seq, samples)
        service = PREFILL_WEIGHT * prompt + DECODE_WEIGHT * generated
        if service:
            weight = self.weights.get(seq.tenant, 1.0)
            self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + service / weight

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = check_weights(weights)

    def service(self) -> dict[str, TenantService]:
        return self._book.snapshot(dict(self.counters))


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """A copy of ``weights``; ValueError unless every weight is a positive finite number."""
    if not all(0 < weight < math.inf for weight in weights.values()):
        raise ValueError(f"tenant weights must be positive, got {dict(weights)}")
    return dict(weights)


def _queues(waiting: list[Sequence]) -> dict[str, deque[Sequence]]:
    """Each tenant's waiting sequences, by (priority, arrival)."""
    queues: defaultdict[str, list[Sequence]] = defaultdict(list)
    for seq in waiting:
        queues[seq.tenant].append(seq)
    return {tenant: deque(sorted(seqs, key=_own_order)) for tenant, seqs in queues.items()}


def make_policy(name: str) -> AdmissionPolicy:
    """The policy ``--scheduling`` names (ValueError for another name)."""
    if name == "fair":
        return VirtualTokenCounter()
    if name == "fcfs":
        return FcfsPolicy()
    raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING_POLICIES)}, got {name!r}")
