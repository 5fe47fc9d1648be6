"""Adapter tiers: device slot ← host memory ← disk, as an explicit state machine.

States of one adapter version and the named transitions between them (``Transition``):

    ON_DISK ──load_start──► LOADING ──load_done──► IN_HOST ──activate──► IN_SLOT
       ▲ ▲                     └──load_fail──► FAILED        ◄──evict_slot──┘
       │ └──retry (a transient failure, RETRY_AFTER_S later)──┘
       └──────────evict_host─────────────────────┘

- load_start: first use, prefetch or pin starts one background read (single-flight: every
  request for a loading adapter waits on the same read).
- load_done / load_fail: the read validated, or not (the error is kept for the waiting requests).
- retry: a load that failed for a transient reason (``StoreUnavailableError``: the shared bucket
  was down) is tried again by the next use ``RETRY_AFTER_S`` after the failure; other failures
  (a corrupt file) stay failed.
- activate: ``try_activate`` copies the host weights into a free slot, or into the least recently
  used slot whose adapter is neither leased by a running sequence nor pinned.
- evict_slot: that slot was taken for another adapter; the host copy stays.
- evict_host: host copies beyond ``max_host_bytes`` are dropped, least recently used first, when
  they are not in a slot, not pinned, and can be read again from disk.

Pinned adapters are never evicted from either tier. An adapter unregistered while leased stays in
its slot until the last lease is released, so running requests finish on the version they began.

The engine loop is the only caller of try_activate/acquire/release; registration, pins and
snapshots may come from other threads, so every state change holds one lock. The cache writes
device slots through the small ``SlotWriter`` protocol the model implements and imports nothing
from the server. ``stats`` counts transitions, lookups per tier and load latency for metrics.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters.cache_types import (  # the cache's public vocabulary, re-exported
    AdapterState,
    AdapterStatus,
    CacheStats,
    SlotWriter,
    Tier,
    Transition,
)
from adapters.errors import PinError, StoreUnavailableError
from adapters.format import LoRAWeights

RETRY_AFTER_S = 1.0  # a load that failed for a transient reason is tried again this long after

__all__ = [
    "AdapterCache",
    "AdapterState",
    "AdapterStatus",
    "CacheStats",
    "SlotWriter",
    "Tier",
    "Transition",
]


@dataclass(eq=False)
class _Entry:
    adapter_id: str
    source: Path | None
    content_key: str  # what the adapter computes (adapters.format.content_key); the prefix cache's key
    weights: LoRAWeights | None = None
    state: AdapterState = AdapterState.ON_DISK
    slot: int | None = None
    refcount: int = 0
    is_pinned: bool = False
    is_retired: bool = False  # unregistered while in use: freed when the last user releases it
    load: Future[LoRAWeights] | None = None
    load_started_s: float = 0.0
    failed_at_s: float = 0.0
    error: Exception | None = None


class AdapterCache:
    """The adapters one engine knows: ``num_slots`` device slots, a host tier of ``max_host_bytes``.

    ``read(path)`` reads and validates an adapter from disk (it runs on a background thread);
    ``on_transition(transition)`` and ``on_load(seconds)`` are optional hooks for metrics.
    """

    def __init__(self, writer: SlotWriter, num_slots: int, read: Callable[[Path], LoRAWeights],
                 max_host_bytes: int | None = None, pin_host_memory: bool = False,
                 on_transition: Callable[[Transition], None] | None = None) -> None:  # fmt: skip
        self.writer, self.read, self.num_slots = writer, read, num_slots
        self.max_host_bytes = max_host_bytes
        self.pin_host_memory = pin_host_memory  # page-locked host copies: faster, async H2D copies
        self.on_transition = on_transition
        self.stats = CacheStats()
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_lru: OrderedDict[int, _Entry] = OrderedDict()  # slot → entry, oldest first
        self._host_lru: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) → entry with weights
        self._host_bytes = 0
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        self._fetch: Callable[[Path], None] | None = None

    def set_fetch(self, fetch: Callable[[Path], None]) -> None:
        """The tier below disk: ``fetch(source)`` makes ``source`` present (e.g. downloads it from a
        shared bucket) before it is read; it runs on the load thread, and its errors fail the load."""
        self._fetch = fetch

    # ---- registration (any thread) ----
    def register(self, adapter_id: str, source: Path | None, weights: LoRAWeights | None = None,
                 content_key: str | None = None) -> None:  # fmt: skip
        """Make an adapter version known: read from ``source`` on first use, or given ``weights`` now.

        With both, the weights are used now and may be dropped from host memory later (they can
        be read again from ``source``); with weights only, they stay in host memory for good.
        ``content_key`` names its content (equal keys must compute the same function); without one
        it gets a key of its own, shared with no other registration.
        """
        if source is None and weights is None:
            raise ValueError("register needs a source path, host weights, or both")
        if weights is not None:
            self.writer.validate(weights)
        with self._lock:
            if self.is_registered(adapter_id):
                raise KeyError(f"adapter {adapter_id!r} is already registered")
            entry = _Entry(adapter_id, source, content_key or f"registration-{uuid.uuid4().hex}")
            self._entries[adapter_id] = entry
            if weights is not None:
                self._hold(entry, weights)
                entry.state = AdapterState.IN_HOST
                self._trim_host()

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter; one in use stays in its slot until its last sequence releases it."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.is_retired:
                raise KeyError(f"adapter {adapter_id!r} is not registered")
            entry.is_retired, entry.is_pinned = True, False
            if entry.refcount == 0:
                self._drop(entry)

    def is_registered(self, adapter_id: str) -> bool:
        entry = self._entries.get(adapter_id)
        return entry is not None and not entry.is_retired

    def registered_ids(self) -> list[str]:
        with self._lock:
            return [i for i, e in self._entries.items() if not e.is_retired]

    def content_key(self, adapter_id: str) -> str:
        """The registered adapter's content key (KeyError if it is not registered)."""
        with self._lock:
            return self._live(adapter_id).content_key

    def state(self, adapter_id: str) -> AdapterState:
        return self._entries[adapter_id].state

    def error(self, adapter_id: str) -> Exception | None:
        entry = self._entries.get(adapter_id)
        return None if entry is None else entry.error

    def status(self, adapter_id: str) -> AdapterStatus:
        with self._lock:
            entry = self._live(adapter_id)
            self._collect_load(entry)
            host_bytes = entry.weights.num_bytes if entry.weights is not None else 0
            error = None if entry.error is None else str(entry.error)
            return AdapterStatus(adapter_id, entry.state, entry.slot, entry.is_pinned, entry.refcount,
                                 host_bytes, error)  # fmt: skip

    def count_by_state(self) -> Counter[AdapterState]:
        """Registered adapters per state, in one pass under the lock (finished loads collected)."""
        with self._lock:
            live = [e for e in self._entries.values() if not e.is_retired]
            for entry in live:
                self._collect_load(entry)
            return Counter(e.state for e in live)

    def host_weights(self, adapter_id: str) -> LoRAWeights | None:
        """The adapter's host copy when it is in host memory (or a slot), else None."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            return None if entry is None or entry.is_retired else entry.weights

    def host_bytes(self) -> int:
        """Bytes of adapter weights held in host memory (slot-resident adapters included)."""
        return self._host_bytes

    def slot_usage(self) -> int:
        return len(self._slot_lru)

    def prefetch(self, adapter_id: str) -> None:
        """Start the disk read of a queued request's adapter, so it is in host memory when needed."""
        with self._lock:
            self._ensure_loading(self._live(adapter_id))

    def pin(self, adapter_id: str) -> None:
        """Keep this adapter resident: loaded now, never evicted from its slot or from host memory.

        At most ``num_slots - 1`` adapters may be pinned, so other adapters can still be served.
        """
        with self._lock:
            entry = self._live(adapter_id)
            num_pinned = sum(e.is_pinned for e in self._entries.values() if e is not entry)
            if not entry.is_pinned and num_pinned >= self.num_slots - 1:
                raise PinError(
                    f"cannot pin {adapter_id!r}: {num_pinned} of {self.num_slots} adapter slots are pinned "
                    "and one must stay free for the others; unpin one or raise --max-loras"
                )
            entry.is_pinned = True
            self._ensure_loading(entry)

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._live(adapter_id).is_pinned = False
            self._trim_host()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- engine loop ----
    def try_activate(self, adapter_id: str) -> int | None:
        """The adapter's slot, copying it in now if it is in host memory and a slot can be had.

        Never blocks on disk: a cold adapter starts loading and None is returned.
        """
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.is_retired:
                return None
            self._collect_load(entry)
            if entry.state is AdapterState.IN_SLOT:
                assert entry.slot is not None  # IN_SLOT: it has one
                self.stats.lookups[Tier.SLOT] += 1
                self._slot_lru.move_to_end(entry.slot)
                self._touch_host(entry)
                return entry.slot
            if entry.state is not AdapterState.IN_HOST:
                self._ensure_loading(entry)
                return None
            return self._activate(entry)

    def acquire(self, adapter_id: str) -> _Entry:
        """Lease a resident adapter for one running sequence; the lease names this exact version."""
        with self._lock:
            entry = self._entries[adapter_id]
            if entry.slot is None:
                raise KeyError(f"adapter {adapter_id!r} is not in a slot")
            entry.refcount += 1
            return entry

    @staticmethod
    def lease_slot(lease: _Entry) -> int:
        assert lease.slot is not None  # a leased adapter keeps its slot until released
        return lease.slot

    def release(self, lease: _Entry) -> None:
        with self._lock:
            lease.refcount -= 1
            if lease.refcount == 0 and lease.is_retired:
                self._drop(lease)

    # ---- internals (lock held) ----
    def _live(self, adapter_id: str) -> _Entry:
        entry = self._entries.get(adapter_id)
        if entry is None or entry.is_retired:
            raise KeyError(f"adapter {adapter_id!r} is not registered")
        return entry

    def _move(self, entry: _Entry, transition: Transition) -> None:
        assert entry.state is transition.source, (entry.adapter_id, entry.state, transition)
        entry.state = transition.target
        self.stats.transitions[transition] += 1
        if self.on_transition is not None:
            self.on_transition(transition)

    def _activate(self, entry: _Entry) -> int | None:
        slot = self._take_slot()
        if slot is None:
            return None
        self.stats.lookups[Tier.HOST] += 1
        assert entry.weights is not None  # IN_HOST: it has host weights
        self.writer.write(slot, entry.weights)
        entry.slot = slot
        self._move(entry, Transition.ACTIVATE)
        self._slot_lru[slot] = entry
        self._touch_host(entry)
        self._trim_host()  # the adapter it displaced may now be over the host budget
        return slot

    def _ensure_loading(self, entry: _Entry) -> None:
        if self._may_retry(entry):
            entry.error = None
            self._move(entry, Transition.RETRY)
        if entry.state is AdapterState.ON_DISK and entry.source is not None:
            self.stats.lookups[Tier.DISK] += 1  # a miss in both tiers: first use, prefetch or pin
            self._move(entry, Transition.LOAD_START)
            entry.load_started_s = time.perf_counter()
            entry.load = self._pool.submit(self._read_validated, entry.source)

    @staticmethod
    def _may_retry(entry: _Entry) -> bool:
        transient = isinstance(entry.error, StoreUnavailableError)
        return (
            entry.state is AdapterState.FAILED
            and transient
            and (time.perf_counter() - entry.failed_at_s >= RETRY_AFTER_S)
        )

    def _read_validated(self, path: Path) -> LoRAWeights:
        if self._fetch is not None:
            self._fetch(path)
        weights = self.read(path)
        self.writer.validate(weights)
        if self.pin_host_memory:
            pinned = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.tensors.items()}
            weights = LoRAWeights(weights.config, pinned)
        return weights

    def _collect_load(self, entry: _Entry) -> None:
        if entry.state is not AdapterState.LOADING:
            return
        assert entry.load is not None  # set with LOADING, cleared on leaving it
        if not entry.load.done():
            return
        try:
            weights = entry.load.result()
        except Exception as exc:  # keep the reason; the engine fails the requests that wait on it
            entry.error, entry.failed_at_s = exc, time.perf_counter()
            self._move(entry, Transition.LOAD_FAIL)
        else:
            seconds = time.perf_counter() - entry.load_started_s
            self.stats.load_seconds.append(seconds)
            self.stats.load_seconds_sum += seconds
            self.stats.num_loads += 1
            self._hold(entry, weights)
            self._move(entry, Transition.LOAD_DONE)
            self._trim_host(keep=entry)
        entry.load = None

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for slot, victim in self._slot_lru.items():
            if victim.refcount == 0 and not victim.is_pinned:
                del self._slot_lru[slot]
                victim.slot = None
                self._move(victim, Transition.EVICT_SLOT)
                return slot
        return None

    def _hold(self, entry: _Entry, weights: LoRAWeights) -> None:
        entry.weights = weights
        self._host_bytes += weights.num_bytes
        self._host_lru[id(entry)] = entry

    def _touch_host(self, entry: _Entry) -> None:
        if id(entry) in self._host_lru:
            self._host_lru.move_to_end(id(entry))

    def _release_host(self, entry: _Entry) -> None:
        if self._host_lru.pop(id(entry), None) is not None:
            assert entry.weights is not None  # entries in the host LRU hold weights
            self._host_bytes -= entry.weights.num_bytes
        entry.weights = None

    def _trim_host(self, keep: _Entry | None = None) -> None:
        """Drop least recently used host copies until the host tier fits ``max_host_bytes``."""
        if self.max_host_bytes is None:
            return
        for victim in list(self._host_lru.values()):
            if self._host_bytes <= self.max_host_bytes:
                return
            evictable = victim.state is AdapterState.IN_HOST and victim.source is not None
            if evictable and victim is not keep and not victim.is_pinned:
                self._release_host(victim)
                self._move(victim, Transition.EVICT_HOST)

    def _drop(self, entry: _Entry) -> None:
        if entry.slot is not None:
            del self._slot_lru[entry.slot]
            self.writer.clear(entry.slot)
            self._free_slots.append(entry.slot)
        if entry.load is not None:
            entry.load.cancel()
        self._release_host(entry)
        entry.slot = None
        if self._entries.get(entry.adapter_id) is entry:
            del self._entries[entry.adapter_id]
