"""The adapter registry: uploads in, validated and stored durably, served through the tiers.

One object ties the stages together for the server (which imports it; it imports nothing from the
server):

    upload bytes ─► staging dir ─► read_peft_dir + base-model check ─► store.commit ─► cache.register

Contracts:
- Nothing is stored unless every check passes; a rejected upload leaves no file and no record.
- ``tenant/name`` always resolves to its newest version; a new version is registered in the cache
  under a new id (``tenant/name@version``) and the previous one is unregistered, so requests
  running on it finish on it and new requests get the new one. Delete does the same for every
  version, and the store's files go with it.
- Lookups are served from an in-memory index of the newest versions (the store stays the source
  of truth: the index is rebuilt from it at start).
- Over a shared store (``store.shared``: other replicas upload and delete too) every lookup asks the
  store first and brings the index up to it, so what one replica acknowledged is what every replica
  serves at its next request; with the store unreachable, lookups serve what the index holds.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from adapters.cache import AdapterCache, AdapterStatus
from adapters.errors import (
    AdapterFormatError,
    AdapterTooLargeError,
    StoreUnavailableError,
    UnknownAdapterError,
)
from adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FormatLimits,
    LoRAWeights,
    read_peft_dir,
    validate_name,
)
from adapters.store import AdapterRecord, AdapterStore

_COPY_CHUNK_BYTES = 1 << 20


class AdapterRegistry:
    """Validated, versioned, per-tenant adapters; ``check`` validates them against the base model."""

    def __init__(self, store: AdapterStore, max_lora_rank: int,
                 check: Callable[[LoRAWeights], None] | None = None,
                 limits: FormatLimits | None = None) -> None:  # fmt: skip
        self.store, self.max_lora_rank, self.check = store, max_lora_rank, check
        self.limits = limits or FormatLimits()
        self.cache: AdapterCache | None = None
        self._latest: dict[tuple[str, str], AdapterRecord] = {(r.tenant, r.name): r for r in store.list()}
        self._lock = threading.Lock()  # orders commits with index and cache updates
        # bumped under the lock by every change of a name's entry: a store read taken before a
        # change is stale and must not undo it
        self._changes: dict[tuple[str, str], int] = {}

    def attach(self, cache: AdapterCache) -> None:
        """Serve through ``cache``: every stored adapter is registered there, read on first use."""
        with self._lock:
            self.cache = cache
            cache.set_fetch(self.store.fetch)
            for record in self._latest.values():
                cache.register(record.adapter_id, record.path, content_key=record.content_key)

    # ---- writes ----
    def upload(self, tenant: str, name: str, files: Mapping[str, BinaryIO]) -> AdapterRecord:
        """Store the two peft files (keyed by file name) as the next version of ``tenant/name``."""
        validate_name(tenant, "tenant")
        validate_name(name)
        _check_file_names(files)
        with self.store.staging_dir() as staged:
            self._write_staged(staged, files)
            weights = self._validated(staged)
            with self._lock:
                record = self.store.commit(tenant, name, staged, weights.config)
                self._publish(record, weights)
        return record

    def register_local(self, tenant: str, name: str, path: str | Path) -> AdapterRecord:
        """Serve a peft directory in place (admin only; the store checks the allow-listed roots)."""
        validate_name(tenant, "tenant")
        validate_name(name)
        directory = self.store.check_local_path(path)
        weights = self._validated(directory)
        with self._lock:
            record = self.store.register_local(tenant, name, directory, weights.config)
            self._publish(record, weights)
        return record

    def delete(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Remove every version; requests already running finish on theirs."""
        self._refresh(tenant, name)
        with self._lock:
            if (tenant, name) not in self._latest:
                raise UnknownAdapterError(name)
            current = self._latest.pop((tenant, name))  # new lookups no longer find it
            try:
                removed = self.store.delete(tenant, name)
            except StoreUnavailableError:
                self._latest[(tenant, name)] = current  # nothing was deleted: go on serving it
                raise
            self._unserve(current)
            return removed

    # ---- reads ----
    def resolve(self, tenant: str, name: str) -> AdapterRecord:
        """The newest version of ``tenant/name``; UnknownAdapterError if there is none."""
        self._refresh(tenant, name)
        record = self._latest.get((tenant, name))
        if record is None:
            raise UnknownAdapterError(name)
        return record

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        """Newest version of each adapter, sorted by (tenant, name); ``None``: every tenant."""
        self._refresh_all(tenant)
        records = [r for (t, _), r in self._latest.items() if tenant is None or t == tenant]
        return sorted(records, key=lambda r: (r.tenant, r.name))

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:  # ``list``: the method above
        self.resolve(tenant, name)
        return self.store.versions(tenant, name)

    def status(self, record: AdapterRecord) -> AdapterStatus | None:
        """Where the record sits in the tiers (None when no cache is attached)."""
        if self.cache is None or not self.cache.is_registered(record.adapter_id):
            return None
        return self.cache.status(record.adapter_id)

    def __len__(self) -> int:
        return len(self._latest)

    # ---- a shared store: adopt what other replicas did ----
    def _refresh(self, tenant: str, name: str) -> None:
        """Bring ``tenant/name``'s entry up to a shared store (no-op for a local one)."""
        if not self.store.shared:
            return
        key, seen = (tenant, name), self._changes.get((tenant, name), 0)
        try:
            record = self.store.latest(tenant, name)
        except StoreUnavailableError:
            return  # serve what the index holds until the store is back
        with self._lock:
            if self._changes.get(key, 0) == seen:
                self._adopt(key, record)

    def _refresh_all(self, tenant: str | None) -> None:
        """Bring every entry (of ``tenant``; None: all) up to a shared store."""
        if not self.store.shared:
            return
        seen = dict(self._changes)
        try:
            found = {(r.tenant, r.name): r for r in self.store.list(tenant)}
        except StoreUnavailableError:
            return
        with self._lock:
            keys = {k for k in self._latest if tenant is None or k[0] == tenant} | set(found)
            for key in keys:
                if self._changes.get(key, 0) == seen.get(key, 0):
                    self._adopt(key, found.get(key))

    def _adopt(self, key: tuple[str, str], record: AdapterRecord | None) -> None:
        """Serve ``record`` as the newest version of ``key``, None: it was deleted (lock held)."""
        current = self._latest.get(key)
        if record is None and current is not None:
            del self._latest[key]
            self._unserve(current)
        elif record is not None and (current is None or current.version != record.version):
            self._publish(record, None)

    # ---- internals ----
    def _write_staged(self, staged: Path, files: Mapping[str, BinaryIO]) -> None:
        limits = {CONFIG_FILE: self.limits.max_config_bytes, WEIGHTS_FILE: self.limits.max_weights_bytes}
        for file_name, stream in files.items():
            _copy_limited(stream, staged / file_name, limits[file_name])

    def _validated(self, directory: Path) -> LoRAWeights:
        weights = read_peft_dir(directory, self.max_lora_rank, self.limits)
        if self.check is not None:
            self.check(weights)
        return weights

    def _publish(self, record: AdapterRecord, weights: LoRAWeights | None) -> None:
        """Make ``record`` the served version (lock held); the one it replaces stops taking requests.
        Without ``weights`` the cache reads them from ``record.path`` on first use."""
        key = (record.tenant, record.name)
        previous = self._latest.get(key)
        self._latest[key] = record
        self._changes[key] = self._changes.get(key, 0) + 1
        if self.cache is not None:
            self.cache.register(record.adapter_id, record.path, weights, record.content_key)
        if previous is not None:
            self._unserve(previous)

    def _unserve(self, record: AdapterRecord) -> None:
        key = (record.tenant, record.name)
        self._changes[key] = self._changes.get(key, 0) + 1
        if self.cache is not None and self.cache.is_registered(record.adapter_id):
            self.cache.unregister(record.adapter_id)


def _check_file_names(files: Mapping[str, BinaryIO]) -> None:
    names = set(files)
    unexpected = sorted(names - {CONFIG_FILE, WEIGHTS_FILE})
    if unexpected:
        pickled = [n for n in unexpected if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        why = f"; {', '.join(pickled)}: pickle files are refused, save with safetensors" if pickled else ""
        raise AdapterFormatError(
            f"unexpected file(s) {', '.join(map(repr, unexpected))}: an adapter is exactly "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}{why}"
        )
    missing = sorted({CONFIG_FILE, WEIGHTS_FILE} - names)
    if missing:
        raise AdapterFormatError(f"missing file(s): {', '.join(missing)}")


def _copy_limited(stream: BinaryIO, target: Path, max_bytes: int) -> None:
    """Copy at most ``max_bytes`` from ``stream``; AdapterTooLargeError past that."""
    copied = 0
    with open(target, "wb") as out:
        while chunk := stream.read(_COPY_CHUNK_BYTES):
            copied += len(chunk)
            if copied > max_bytes:
                raise AdapterTooLargeError(f"{target.name} is over the limit of {max_bytes} bytes")
            out.write(chunk)
