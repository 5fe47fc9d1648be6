"""Adapter tiers: device slot ← host memory ← disk, as an explicit state machine.

States of one adapter:  ON_DISK → LOADING → IN_HOST ⇄ IN_SLOT,  LOADING → FAILED
- ON_DISK → LOADING: first use (or prefetch) starts one background read (single-flight).
- LOADING → IN_HOST: the read validated; LOADING → FAILED: it did not (the error is kept).
- IN_HOST → IN_SLOT: ``try_activate`` copies it into a free slot, or evicts the least recently
  used slot whose adapter no running sequence holds.
- IN_SLOT → IN_HOST: evicted. Adapters in use (refcount > 0) are never evicted.

The engine loop is the only caller of try_activate/acquire/release/slot_of; registration may come
from other threads, so state changes take a lock. The cache writes device slots through the small
``SlotWriter`` protocol that the model implements; it imports nothing from the server.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(eq=False)
class _Entry:
    adapter_id: str
    source: Path | None
    weights: LoRAWeights | None = None
    state: AdapterState = AdapterState.ON_DISK
    slot: int | None = None
    refcount: int = 0
    is_retired: bool = False  # unregistered while in use: freed when the last user releases it
    load: Future | None = None
    error: Exception | None = None
    transitions: list[str] = field(default_factory=list)


class AdapterCache:
    """Resident adapters of one engine: ``num_slots`` device slots plus an unbounded host tier."""

    def __init__(self, writer: SlotWriter, num_slots: int, read: Callable[[Path], LoRAWeights]) -> None:
        self.writer = writer
        self.read = read
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_lru: OrderedDict[int, _Entry] = OrderedDict()  # slot → entry, oldest first
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")

    # ---- registration (any thread) ----
    def register(self, adapter_id: str, source: Path | LoRAWeights) -> None:
        """Make an adapter known: host weights now, or a path read on first use."""
        with self._lock:
            if adapter_id in self._entries and not self._entries[adapter_id].is_retired:
                raise KeyError(f"adapter {adapter_id!r} is already registered")
            entry = _Entry(adapter_id, source if isinstance(source, Path) else None)
            if isinstance(source, LoRAWeights):
                self.writer.validate(source)
                entry.weights, entry.state = source, AdapterState.IN_HOST
            self._entries[adapter_id] = entry

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter; one in use stays in its slot until its last sequence releases it."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.is_retired:
                raise KeyError(f"adapter {adapter_id!r} is not registered")
            entry.is_retired = True
            if entry.refcount == 0:
                self._drop(entry)

    def is_registered(self, adapter_id: str) -> bool:
        entry = self._entries.get(adapter_id)
        return entry is not None and not entry.is_retired

    def state(self, adapter_id: str) -> AdapterState:
        return self._entries[adapter_id].state

    def error(self, adapter_id: str) -> Exception | None:
        entry = self._entries.get(adapter_id)
        return None if entry is None else entry.error

    def prefetch(self, adapter_id: str) -> None:
        """Start the disk read of a queued request's adapter, so it is in host memory when needed."""
        with self._lock:
            self._ensure_loading(self._entries[adapter_id])

    # ---- engine loop ----
    def try_activate(self, adapter_id: str) -> int | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.is_retired:
                return None
            self._collect_load(entry)
            if entry.state is AdapterState.IN_SLOT:
                self._slot_lru.move_to_end(entry.slot)
                return entry.slot
            if entry.state is not AdapterState.IN_HOST:
                self._ensure_loading(entry)
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self.writer.write(slot, entry.weights)
            entry.slot, entry.state = slot, AdapterState.IN_SLOT
            self._slot_lru[slot] = entry
            return slot

    def acquire(self, adapter_id: str) -> _Entry:
        """Pin a resident adapter for one running sequence; the lease names this exact version."""
        with self._lock:
            entry = self._entries[adapter_id]
            if entry.slot is None:
                raise KeyError(f"adapter {adapter_id!r} is not in a slot")
            entry.refcount += 1
            return entry

    @staticmethod
    def lease_slot(lease: _Entry) -> int:
        return lease.slot

    def release(self, lease: _Entry) -> None:
        with self._lock:
            entry = lease
            entry.refcount -= 1
            if entry.refcount == 0 and entry.is_retired:
                self._drop(entry)

    def slot_usage(self) -> int:
        return len(self._slot_lru)

    # ---- internals (lock held) ----
    def _ensure_loading(self, entry: _Entry) -> None:
        if entry.state is AdapterState.ON_DISK and entry.source is not None:
            entry.state = AdapterState.LOADING
            entry.load = self._pool.submit(self._read_validated, entry.source)

    def _read_validated(self, path: Path) -> LoRAWeights:
        weights = self.read(path)
        self.writer.validate(weights)
        return weights

    def _collect_load(self, entry: _Entry) -> None:
        if entry.state is not AdapterState.LOADING or not entry.load.done():
            return
        try:
            entry.weights, entry.state = entry.load.result(), AdapterState.IN_HOST
        except Exception as exc:  # keep the reason; the engine fails the requests that wait on it
            entry.error, entry.state = exc, AdapterState.FAILED
        entry.load = None

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for slot, victim in self._slot_lru.items():
            if victim.refcount == 0:
                del self._slot_lru[slot]
                victim.slot, victim.state = None, AdapterState.IN_HOST
                return slot
        return None

    def _drop(self, entry: _Entry) -> None:
        if entry.slot is not None:
            del self._slot_lru[entry.slot]
            self.writer.clear(entry.slot)
            self._free_slots.append(entry.slot)
        entry.slot, entry.weights = None, None
        if self._entries.get(entry.adapter_id) is entry:
            del self._entries[entry.adapter_id]
