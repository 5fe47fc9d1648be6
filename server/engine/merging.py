"""Hot adapters served from merged copies W' = W + s·B·A, switched on and off by traffic.

A merged copy runs at base-model speed: its requests take no LoRA slot and no side path. Life of
one copy (``CopyState``):

    BUILDING ──built──► READY ──cold, or unmerge──► DRAINING ──last request ends──► (dropped)

- The policy (``MergePolicy``) watches each adapter's share of the tokens scheduled over a sliding
  window of steps. An adapter whose share stays ≥ ``merge_share`` for ``merge_after_steps`` steps,
  with at least ``merge_min_requests`` requests running or waiting, gets a copy when fewer than
  ``max_merged_copies`` exist and its bytes fit ``max_merged_bytes``. A copy whose share stays
  below ``unmerge_share`` for ``unmerge_after_steps`` steps drains (hysteresis: the two shares and
  durations differ, so an adapter near one threshold does not flap). Pinned copies (operators:
  ``merge``/``unmerge``) ignore the policy.
- Builds run on a background thread (fp32 accumulation, cast to the serving dtype); decoding goes
  on meanwhile. A new request for the adapter goes to a READY copy; running ones finish where
  they started (a request holds a lease on its copy, like a slot lease).
- A copy belongs to one adapter version (``tenant/name@version``): when that version is
  unregistered (deleted or replaced) its copy drains at once, so a new version is never served
  from an old copy.

Only the engine thread calls into this module (the async ``Engine`` forwards operator calls).
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from adapters.format import LoRAWeights
from server.engine.route import RouteKind
from server.model.host_memory import release_freed_memory
from server.model.lora_linear import MultiLoRALinear

CopyWeights = dict[MultiLoRALinear, torch.Tensor]  # a merged copy: each touched module → its merged weight
TokensByRoute = Counter[tuple[RouteKind, str | None]]  # tokens of one step per (route kind, adapter id)
AdapterCounts = Counter[str | None]  # adapter id (None: the base model alone) → tokens or requests


class CopyState(enum.Enum):
    BUILDING = "building"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class MergePolicyConfig:
    """When to merge and unmerge; see the module docstring. ``enabled`` False: operators only."""

    enabled: bool = True
    max_merged_copies: int = 1
    max_merged_bytes: int | None = None  # None: no byte budget beyond max_merged_copies
    window_steps: int = 64
    merge_share: float = 0.9  # measured: a step split into a merged and a side-path forward costs
    unmerge_share: float = 0.6  # a second read of every base weight (docs/benchmarks.md)
    merge_after_steps: int = 16
    unmerge_after_steps: int = 64
    merge_min_requests: int = 2
    unavailable: str | None = None  # why no copy can be made at all (e.g. a quantized base), else None

    def __post_init__(self) -> None:
        if not 0 < self.unmerge_share < self.merge_share <= 1:
            raise ValueError(
                f"need 0 < unmerge_share ({self.unmerge_share}) < merge_share ({self.merge_share}) <= 1"
            )
        if self.max_merged_copies < 0 or self.window_steps < 1:
            raise ValueError("max_merged_copies must be >= 0 and window_steps >= 1")


@dataclass(eq=False)
class MergedCopy:
    adapter_id: str
    index: int  # stable id of this copy, carried by its requests' Route.copy
    state: CopyState = CopyState.BUILDING
    weights: CopyWeights = field(default_factory=dict)
    num_bytes: int = 0  # once READY
    expected_bytes: int = 0  # while BUILDING
    num_leases: int = 0
    is_pinned: bool = False
    build: Future[CopyWeights] | None = None  # while BUILDING
    build_started_s: float = 0.0
    build_seconds: float = 0.0


@dataclass
class MergeStats:
    """Counters for metrics (read from other threads; each field is updated atomically)."""

    num_merges: int = 0
    num_unmerges: int = 0
    build_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    build_seconds_sum: float = 0.0
    tokens_merged: int = 0
    tokens_base_forward: int = 0  # tokens of the base forward: side path or base model only


class MergeManager:
    """Merged copies of one engine's model; ``build(weights)`` makes a copy's weights (any thread)."""

    def __init__(self, config: MergePolicyConfig, build: Callable[[LoRAWeights], CopyWeights],
                 size_of: Callable[[LoRAWeights], int], host_weights: Callable[[str], LoRAWeights | None],
                 is_registered: Callable[[str], bool]) -> None:  # fmt: skip
        self.config, self._build, self._size_of, self._host_weights = config, build, size_of, host_weights
        self._is_registered = is_registered
        self.copies: dict[str, MergedCopy] = {}  # adapter id → its live copy (not draining)
        self._draining: list[MergedCopy] = []
        self._by_index: dict[int, MergedCopy] = {}
        self._next_index = 0
        self.policy = MergePolicy(config)
        self.stats = MergeStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-build")

    # ---- routing (scheduler) ----
    def route(self, adapter_id: str | None) -> MergedCopy | None:
        """The READY copy a new request for ``adapter_id`` should run on (leased), or None."""
        copy = self.copies.get(adapter_id) if adapter_id is not None else None
        if copy is None or copy.state is not CopyState.READY:
            return None
        copy.num_leases += 1
        return copy

    def release(self, copy: MergedCopy) -> None:
        copy.num_leases -= 1
        self._drop_drained()

    @contextmanager
    def applied(self, index: int | None) -> Iterator[None]:
        """Inside: the model computes with copy ``index``'s merged weights (None: the base weights)."""
        copy = None if index is None else self._by_index.get(index)
        modules = list(copy.weights.items()) if copy is not None else []
        for module, weight in modules:
            module.active_weight = weight
        try:
            yield
        finally:
            for module, _ in modules:
                module.active_weight = None

    # ---- operators ----
    def merge(self, adapter_id: str) -> MergedCopy:
        """Build (or keep) a pinned copy that the policy never drops; ValueError if none can be had.

        At ``max_merged_copies``, an unpinned copy drains to make room.
        """
        copy = self.copies.get(adapter_id)
        if copy is None:
            unpinned = [c for c in self.copies.values() if not c.is_pinned]
            if len(self.copies) >= self.config.max_merged_copies and unpinned:
                self._drain(unpinned[0])
            copy = self._start_build(adapter_id, pinned=True)
        if copy is None:
            raise ValueError(f"adapter {adapter_id!r} cannot be merged now: {self._why_not(adapter_id)}")
        copy.is_pinned = True
        return copy

    def unmerge(self, adapter_id: str) -> None:
        copy = self.copies.get(adapter_id)
        if copy is None:
            raise KeyError(f"adapter {adapter_id!r} has no merged copy")
        self._drain(copy)

    def is_merged(self, adapter_id: str) -> bool:
        copy = self.copies.get(adapter_id)
        return copy is not None and copy.state is CopyState.READY

    def poll(self) -> None:
        """Pick up finished builds and drain copies of adapters no longer registered (every step)."""
        self._collect_builds()
        for copy in list(self.copies.values()):
            if not self._is_registered(copy.adapter_id):
                self._drain(copy)

    def bytes_held(self) -> int:
        return sum(c.num_bytes for c in [*self.copies.values(), *self._draining])

    # ---- once per step (engine thread) ----
    def after_step(
        self, tokens_by_adapter: TokensByRoute, queued_by_adapter: Callable[[], AdapterCounts]
    ) -> None:
        """Collect finished builds, drop stale copies, and let the policy merge or unmerge.

        ``queued_by_adapter()`` (requests running or waiting per adapter) is only asked for when
        the policy is on.
        """
        for (route, _), num_tokens in tokens_by_adapter.items():
            if route is RouteKind.MERGED:
                self.stats.tokens_merged += num_tokens
            else:
                self.stats.tokens_base_forward += num_tokens
        self.poll()
        if not self.config.enabled:
            return
        decisions = self.policy.observe(tokens_by_adapter, queued_by_adapter(), set(self.copies))
        for adapter_id in decisions.unmerge:
            copy = self.copies.get(adapter_id)
            if copy is not None and not copy.is_pinned:
                self._drain(copy)
        for adapter_id in decisions.merge:
            self._start_build(adapter_id, pinned=False)

    # ---- internals ----
    def _why_not(self, adapter_id: str) -> str:
        if self.config.unavailable is not None:
            return self.config.unavailable
        if not self._is_registered(adapter_id):
            return "it is not registered"
        if self._host_weights(adapter_id) is None:
            return "its weights are not in memory yet (send it a request or pin it first)"
        return f"max_merged_copies={self.config.max_merged_copies} copies exist"

    def _start_build(self, adapter_id: str, pinned: bool) -> MergedCopy | None:
        """Start building a copy unless one cannot be had now; the policy's copies must also fit
        ``max_merged_bytes`` (checked before building, so an oversized copy is never built)."""
        weights = self._host_weights(adapter_id) if self._is_registered(adapter_id) else None
        if weights is None or len(self.copies) >= self.config.max_merged_copies:
            return None
        if not pinned and not self._fits_budget(weights):
            return None
        copy = MergedCopy(adapter_id, self._next_index, is_pinned=pinned, build_started_s=time.perf_counter())
        self._next_index += 1
        copy.expected_bytes = self._size_of(weights)
        copy.build = self._pool.submit(self._build, weights)
        self.copies[adapter_id] = copy
        self._by_index[copy.index] = copy
        return copy

    def _collect_builds(self) -> None:
        for copy in list(self.copies.values()):
            if copy.state is not CopyState.BUILDING:
                continue
            assert copy.build is not None  # BUILDING: its build was submitted
            if not copy.build.done():
                continue
            weights, copy.build = copy.build.result(), None
            num_bytes = sum(w.numel() * w.element_size() for w in weights.values())
            copy.weights, copy.num_bytes, copy.state = weights, num_bytes, CopyState.READY
            copy.build_seconds = time.perf_counter() - copy.build_started_s
            self.stats.num_merges += 1
            self.stats.build_seconds.append(copy.build_seconds)
            self.stats.build_seconds_sum += copy.build_seconds

    def _fits_budget(self, weights: LoRAWeights) -> bool:
        """Whether a copy of ``weights`` fits ``max_merged_bytes`` beside the copies held and being
        built (a building copy counts at its expected size)."""
        budget = self.config.max_merged_bytes
        if budget is None:
            return True
        building = [c for c in self.copies.values() if c.state is CopyState.BUILDING]
        pending = sum(c.expected_bytes for c in building)
        return self.bytes_held() + pending + self._size_of(weights) <= budget

    def _drain(self, copy: MergedCopy) -> None:
        if copy.state is CopyState.BUILDING:
            assert copy.build is not None  # BUILDING: its build was submitted
            copy.build.cancel()
            self._forget(copy)
            return
        copy.state = CopyState.DRAINING
        del self.copies[copy.adapter_id]
        self._draining.append(copy)
        self.stats.num_unmerges += 1
        self._drop_drained()

    def _drop_drained(self) -> None:
        dropped = [c for c in self._draining if c.num_leases == 0]
        for copy in dropped:
            self._draining.remove(copy)
            self._by_index.pop(copy.index, None)
            copy.weights = {}  # the merged tensors are freed here
        if dropped:
            release_freed_memory()

    def _forget(self, copy: MergedCopy) -> None:
        """Drop a copy that never served (cancelled or over budget)."""
        copy.state, copy.weights = CopyState.DRAINING, {}
        self.copies.pop(copy.adapter_id, None)
        self._by_index.pop(copy.index, None)


@dataclass(frozen=True)
class PolicyDecisions:
    merge: list[str]
    unmerge: list[str]


class MergePolicy:
    """Per-adapter token shares over a sliding window of steps, with hysteresis."""

    def __init__(self, config: MergePolicyConfig) -> None:
        self.config = config
        self._window: deque[AdapterCounts] = deque(maxlen=config.window_steps)  # one step's tokens each
        self._window_total: AdapterCounts = Counter()  # the sum of the window, kept up to date step by step
        self._hot_steps: Counter[str] = Counter()  # consecutive steps above merge_share
        self._cold_steps: Counter[str] = Counter()  # consecutive steps below unmerge_share

    def shares(self) -> dict[str, float]:
        total = self._window_total
        num_tokens = sum(total.values())
        return {a: n / num_tokens for a, n in total.items() if a is not None} if num_tokens else {}

    def observe(
        self, tokens_by_adapter: TokensByRoute, queued: AdapterCounts, merged: set[str]
    ) -> PolicyDecisions:
        step: AdapterCounts = Counter()
        for (_, adapter_id), num in tokens_by_adapter.items():
            step[adapter_id] += num
        if len(self._window) == self._window.maxlen:
            self._window_total.subtract(self._window[0])
        self._window.append(step)
        self._window_total.update(step)
        self._window_total = +self._window_total  # drop adapters that left the window
        if len(self._window) < self.config.window_steps:  # the window's maxlen
            return PolicyDecisions([], [])
        shares = self.shares()
        merge: list[str] = []
        unmerge: list[str] = []
        for adapter_id in set(shares) | merged | set(self._hot_steps):
            share = shares.get(adapter_id, 0.0)
            hot = share >= self.config.merge_share and queued[adapter_id] >= self.config.merge_min_requests
            self._hot_steps[adapter_id] = self._hot_steps[adapter_id] + 1 if hot else 0
            if adapter_id in merged and share < self.config.unmerge_share:
                self._cold_steps[adapter_id] += 1
            else:
                self._cold_steps.pop(adapter_id, None)
            if adapter_id not in merged and self._hot_steps[adapter_id] >= self.config.merge_after_steps:
                merge.append(adapter_id)
            if adapter_id in merged and self._cold_steps[adapter_id] >= self.config.unmerge_after_steps:
                unmerge.append(adapter_id)
        self._hot_steps = +self._hot_steps  # drop zero counts so the dict stays small
        return PolicyDecisions(sorted(merge, key=lambda a: -shares.get(a, 0.0)), unmerge)
