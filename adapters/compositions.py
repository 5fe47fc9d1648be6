"""Composed adapters: a request's ``adapters`` + ``combination`` → an adapter the engine serves.

    [(tenant, name, weight)…] + Recipe ─► registry.resolve each ─► content key ─► built? reuse
                                             │                                     │ no
                                             ▼                                     ▼
                               404-like CompositionError           read components, compose,
                                                                   check, write a peft dir,
                                                                   cache.register

Contracts:
- A composition is identified by its content: the components' content keys (their sha256 and the
  config that scales them, so a re-upload makes a new one), their weights and the recipe; the
  adapter cache (hence the prefix cache) knows it by that key. Its engine id is
  ``<tenant>/~composed-<key>``, the requesting tenant's own, so tenants never share one (nor
  learn, by timing, what another built).
- It is built once (concurrent requests for one key wait for the first build), written to
  ``root/<key>`` as a peft adapter (the disk tier: the host tier may drop it and read it back) and
  registered in the adapter cache, so it is batched and tiered like any upload.
- At most ``max_kept`` compositions stay registered; the least recently used beyond that is
  unregistered (requests running on it finish on it) and its files removed.
- Every refusal is a ``CompositionError`` naming the request parameter; an adapter the tenant may
  not see reads as unknown.
- A build runs on a thread of its own that ends with it, never on the request's (pooled) thread:
  torch's parallel ops leave an OpenMP thread team on the thread that ran them, and once libgomp
  manages more threads than there are cores it stops spinning between parallel regions, so every
  engine step after the first build paid a wake-up per region (on 2 cores: base-model TTFT 31 →
  46-51 ms, the "cached composition is slower than a plain adapter" of docs/benchmarks.md). A
  thread that ends takes its team with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from adapters.compose import Recipe, compose
from adapters.errors import AdapterFormatError, CompositionError, UnknownAdapterError
from adapters.format import LoRAWeights, read_peft_dir, write_peft_dir
from adapters.registry import AdapterRegistry
from adapters.store import AdapterRecord

T = TypeVar("T")
DEFAULT_MAX_KEPT = 64
ID_MARKER = "~composed-"  # "~" is not allowed in adapter names: no upload can take such an id


@dataclass(frozen=True)
class Component:
    tenant: str
    name: str
    weight: float


@dataclass(frozen=True)
class Composed:
    adapter_id: str  # the engine / cache id
    key: str  # hex sha256 of the content
    path: Path  # the peft directory


class Compositions:
    """The composed adapters of one registry (its cache must be attached)."""

    def __init__(self, registry: AdapterRegistry, root: Path | None = None,
                 max_kept: int = DEFAULT_MAX_KEPT) -> None:  # fmt: skip
        self.registry, self.max_kept = registry, max_kept
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="loraplex-compositions-"))
        shutil.rmtree(root, ignore_errors=True)  # content-keyed: nothing left there is needed
        root.mkdir(parents=True)
        self.root = root
        self._kept: OrderedDict[str, Composed] = OrderedDict()  # adapter id → composed, LRU first
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def resolve(self, tenant: str, components: Sequence[Component], recipe: Recipe) -> Composed:
        """The composed adapter for ``tenant`` (built now if new); CompositionError if it cannot be."""
        recipe.check(len(components))
        records = tuple(self._record(i, c) for i, c in enumerate(components))
        key = content_key(records, recipe)
        adapter_id = f"{tenant}/{ID_MARKER}{key[:32]}"
        with self._lock:
            build_lock = self._building.setdefault(adapter_id, threading.Lock())
        with build_lock:  # one build per key; the others wait and reuse it
            with self._lock:
                composed = self._kept.get(adapter_id)
                if composed is not None:
                    self._kept.move_to_end(adapter_id)
                    return composed
            try:
                composed = on_own_thread(lambda: self._build(adapter_id, key, records, recipe))
            except BaseException:
                with self._lock:  # a failed build leaves no lock behind
                    self._building.pop(adapter_id, None)
                raise
            with self._lock:
                self._kept[adapter_id] = composed
                self._building.pop(adapter_id, None)
                evicted = self._over_capacity()
        for old in evicted:
            self._forget(old)
        return composed

    def __len__(self) -> int:
        return len(self._kept)

    # ---- internals ----
    def _record(self, index: int, component: Component) -> AdapterRecord:
        try:
            return self.registry.resolve(component.tenant, component.name)
        except UnknownAdapterError:
            raise CompositionError(
                f"adapters[{index}]: the adapter {component.name!r} does not exist", "adapters"
            ) from None

    def _build(
        self, adapter_id: str, key: str, records: tuple[AdapterRecord, ...], recipe: Recipe
    ) -> Composed:
        weights = compose([self._read(r) for r in records], recipe, self.registry.max_lora_rank)
        if self.registry.check is not None:
            try:
                self.registry.check(weights)
            except AdapterFormatError as exc:
                raise CompositionError(
                    f"the composed adapter does not fit the base model: {exc}", "adapters"
                ) from exc
        path = self.root / key
        staged = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=self.root))
        write_peft_dir(weights, staged)
        shutil.rmtree(path, ignore_errors=True)
        staged.rename(path)
        cache = self.registry.cache
        if cache is not None:
            cache.register(adapter_id, path, weights, key)
        return Composed(adapter_id, key, path)

    def _read(self, record: AdapterRecord) -> LoRAWeights:
        self.registry.store.fetch(record.path)
        return read_peft_dir(record.path, self.registry.max_lora_rank, self.registry.limits)

    def _over_capacity(self) -> list[Composed]:
        evicted = []
        while len(self._kept) > self.max_kept:
            evicted.append(self._kept.popitem(last=False)[1])
        return evicted

    def _forget(self, composed: Composed) -> None:
        cache = self.registry.cache
        if cache is not None and cache.is_registered(composed.adapter_id):
            cache.unregister(composed.adapter_id)
        shutil.rmtree(composed.path, ignore_errors=True)


def on_own_thread(work: Callable[[], T]) -> T:
    """``work()`` run on a new thread, joined; its exception re-raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    thread = threading.Thread(target=run, name="loraplex-compose")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def content_key(records: Sequence[AdapterRecord], recipe: Recipe) -> str:
    """hex sha256 of the components' contents (``AdapterRecord.content_key``: their files and the
    config that scales them) with their weights and the recipe."""
    content = {"components": [r.content_key for r in records], **recipe.key}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
