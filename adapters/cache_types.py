"""The vocabulary of the adapter tiers: states, named transitions, tiers, stats, status.

``adapters/cache.py`` implements the state machine; this module only names its parts, so metrics,
admin APIs and tests can refer to them without the machinery.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from adapters.format import LoRAWeights


class SlotWriter(Protocol):
    def validate(self, weights: LoRAWeights) -> None: ...
    def write(self, slot: int, weights: LoRAWeights) -> None: ...
    def clear(self, slot: int) -> None: ...


class AdapterState(enum.Enum):
    ON_DISK = "on_disk"
    LOADING = "loading"
    IN_HOST = "in_host"
    IN_SLOT = "in_slot"
    FAILED = "failed"


class Transition(enum.Enum):
    LOAD_START = ("load_start", AdapterState.ON_DISK, AdapterState.LOADING)
    LOAD_DONE = ("load_done", AdapterState.LOADING, AdapterState.IN_HOST)
    LOAD_FAIL = ("load_fail", AdapterState.LOADING, AdapterState.FAILED)
    RETRY = ("retry", AdapterState.FAILED, AdapterState.ON_DISK)  # after a transient failure only
    ACTIVATE = ("activate", AdapterState.IN_HOST, AdapterState.IN_SLOT)
    EVICT_SLOT = ("evict_slot", AdapterState.IN_SLOT, AdapterState.IN_HOST)
    EVICT_HOST = ("evict_host", AdapterState.IN_HOST, AdapterState.ON_DISK)

    def __init__(self, label: str, source: AdapterState, target: AdapterState) -> None:
        self.label, self.source, self.target = label, source, target


class Tier(enum.Enum):
    """Where ``try_activate`` found an adapter: a hit in the slot tier, host tier, or a disk miss."""

    SLOT = "slot"
    HOST = "host"
    DISK = "disk"


@dataclass
class CacheStats:
    """Monotonic counters for metrics; read without the lock (each field is updated atomically)."""

    transitions: Counter[Transition] = field(default_factory=Counter)  # Transition → count
    lookups: Counter[Tier] = field(default_factory=Counter)  # Tier → count of try_activate calls served there
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))  # recent successful loads
    load_seconds_sum: float = 0.0
    num_loads: int = 0


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter's place in the tiers, for admin APIs and dashboards."""

    adapter_id: str
    state: AdapterState
    slot: int | None
    is_pinned: bool
    num_leases: int
    host_bytes: int
    error: str | None
