"""The shared adapter catalogue: metadata in PostgreSQL, files in an S3-compatible bucket (issue 17).

Several replicas open the same database and bucket; each keeps the versions it has served in a
local disk tier under ``data_dir`` (``shared/<tenant>/<name>/v<N>/``), downloaded on first use.

An upload becomes a version in three steps, none holding a lock across the network::

    1. UPDATE the (tenant, name) counter ... RETURNING  → N   (its own transaction; N is never reused)
    2. put the files under <prefix>/<tenant>/<name>/vN/, then its COMMITTED marker   (adapters.blobs)
    3. INSERT the row (tenant, name, N, sha256, ...)                                   ← acknowledged

The row is the truth: a version exists when its row does. A replica killed between 2 and 3 leaves
files nobody lists (never a half adapter); two replicas uploading one name at once get N and N+1
from the counter and write different keys, so neither can tear the other. A failure of the database
or the bucket is ``StoreUnavailableError`` (HTTP 503) and changes nothing a reader can see. After a
failure the database is not tried again for ``RETRY_AFTER_S``: reads fail at once (callers serve
from what they hold) instead of each waiting for the connection timeout.

psycopg and boto3 are the ``shared`` extra.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adapters.blobs import S3Blobs
from adapters.errors import StoreError, StoreUnavailableError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, LoRAConfig
from adapters.store import AdapterRecord, adapter_files, check_names, files_digest, remove_tree
from adapters.urls import redact

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0  # after a failed call, fail fast for this long before trying the database again
CONNECT_TIMEOUT_S = 3  # a connect that hangs (no answer at all) gives up after this
_SCHEMA_LOCK = 0x6C6F7261  # pg_advisory_xact_lock key: replicas starting together create tables once
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS loraplex_adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
    rank INTEGER NOT NULL, alpha DOUBLE PRECISION NOT NULL, use_rslora BOOLEAN NOT NULL,
    target_modules TEXT[] NOT NULL, base_model_name_or_path TEXT, size_bytes BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, blob_key TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version))""",
    # the highest version ever handed out per name; it survives deletes so that an id is never reused
    """CREATE TABLE IF NOT EXISTS loraplex_version_counters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL, PRIMARY KEY (tenant, name))""",
)
_COLUMNS = (
    "tenant, name, version, sha256, rank, alpha, use_rslora, target_modules, "
    "base_model_name_or_path, size_bytes, created_at"
)
_NO_LOCAL_DIRS = (
    "local adapter directories cannot be served from a shared adapter store (other replicas cannot "
    "read them): upload the adapter with POST /v1/adapters instead"
)
_LATEST = (
    "SELECT DISTINCT ON (tenant, name) " + _COLUMNS + " FROM loraplex_adapters "
    "WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s) ORDER BY tenant, name, version DESC"
)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "a postgresql:// adapter store needs psycopg: pip install 'loraplex[shared]'"
        ) from None
    return psycopg


class _Busy(Exception):
    """Every connection stayed in use for the whole timeout."""


class _Connections:
    """Up to ``size`` reused connections (autocommit; each transaction is explicit).

    Unlike a pool that reconnects in the background and makes callers wait for it, a connection
    that cannot be made fails at once (a refused connect is immediate), so an outage costs callers
    an error, not a timeout each. An idle connection is checked with an empty query before reuse;
    a dead one (the server restarted) is replaced.
    """

    def __init__(self, psycopg: Any, url: str, size: int) -> None:
        self._psycopg, self._url = psycopg, url
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def take(self) -> Iterator[Any]:
        if not self._slots.acquire(timeout=CONNECT_TIMEOUT_S):
            raise _Busy(f"all connections stayed busy for {CONNECT_TIMEOUT_S} s")
        try:
            connection = self._reusable() or self._psycopg.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
            try:
                yield connection
            except BaseException:
                connection.close()  # its state is unknown: never reuse it
                raise
            with self._lock:
                self._idle.append(connection)
        finally:
            self._slots.release()

    def _reusable(self) -> Any:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            try:
                connection.execute("")
                return connection
            except self._psycopg.Error:
                connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class SharedAdapterStore:
    """An ``AdapterStore`` shared by replicas: PostgreSQL at ``database_url``, files in ``blobs``.

    ``shared`` is True: another process may change the catalogue at any time, so readers (the
    registry) ask the store rather than trusting what they saw. Versions are read from the local
    disk tier under ``data_dir``; ``fetch`` fills it from the bucket. Directories on a machine
    cannot be shared, so ``register_local`` is refused.
    """

    shared = True

    def __init__(self, database_url: str, blobs: S3Blobs, data_dir: Path, pool_size: int = 8) -> None:
        self._psycopg = _psycopg()
        self.blobs, self.url = blobs, redact(database_url)
        self.data_dir = Path(os.path.realpath(data_dir))
        self.allowed_roots: tuple[Path, ...] = ()
        self.problems: list[str] = []
        self._local, self._staging = self.data_dir / "shared", self.data_dir / "shared-staging"
        shutil.rmtree(self._staging, ignore_errors=True)  # uploads of a previous run: never acked
        for directory in (self._local, self._staging):
            directory.mkdir(parents=True, exist_ok=True)
        self._connections = _Connections(self._psycopg, database_url, pool_size)
        self._down_until = 0.0
        with self._transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                cursor.execute(statement)

    def close(self) -> None:
        self._connections.close()

    # ---- the database

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor in one transaction; every database failure becomes StoreUnavailableError."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailableError(f"the adapter database {self.url} is unreachable (retrying shortly)")
        try:
            with self._connections.take() as conn, conn.transaction(), conn.cursor() as cursor:
                yield cursor
        except (self._psycopg.Error, _Busy) as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            logger.warning("adapter database %s: %s", self.url, exc)
            raise StoreUnavailableError(f"the adapter database {self.url} is unreachable: {exc}") from exc

    def _rows(self, query: str, params: dict[str, object]) -> builtins.list[AdapterRecord]:
        with self._transaction() as cursor:
            cursor.execute(query, params)
            rows = cursor.fetchall()
        return [self._record(row) for row in rows]

    def _record(self, row: tuple[Any, ...]) -> AdapterRecord:
        tenant, name, version, sha, rank, alpha, use_rslora, targets, base, size, created = row
        return AdapterRecord(tenant, name, version, sha, rank, alpha, use_rslora, tuple(targets), base,
                             size, created, self._local_dir(tenant, name, version), "upload")  # fmt: skip

    # ---- writes

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        path = self._staging / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, tenant: str, name: str, staged: Path, config: LoRAConfig) -> AdapterRecord:
        check_names(tenant, name)
        staged = Path(staged)
        if staged.parent != self._staging or staged.is_symlink() or not staged.is_dir():
            raise StoreError(f"{staged} is not a staging dir of this store (use staging_dir())")
        sha256, size = files_digest(adapter_files(staged))
        version = self._next_version(tenant, name)
        key = self.blobs.key(tenant, name, version)
        self.blobs.put_dir(key, staged)
        record = AdapterRecord(
            tenant, name, version, sha256, config.rank, float(config.alpha), bool(config.use_rslora),
            tuple(config.target_modules), config.base_model_name_or_path, size, time.time(),
            self._local_dir(tenant, name, version), "upload",
        )  # fmt: skip
        try:
            self._insert(record, key)
        except StoreUnavailableError:
            with contextlib.suppress(StoreUnavailableError):
                self.blobs.delete(key)  # never listed anyway: the row is what makes a version
            raise
        self._keep_local(staged, record.path)
        return record

    def register_local(self, tenant: str, name: str, path: Path, config: LoRAConfig) -> AdapterRecord:
        raise StoreError(_NO_LOCAL_DIRS)

    def check_local_path(self, path: str | Path) -> Path:
        raise StoreError(_NO_LOCAL_DIRS)

    def delete(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        """Remove every version's row (the adapter is gone everywhere), then its files."""
        check_names(tenant, name)
        with self._transaction() as cursor:
            cursor.execute(
                f"DELETE FROM loraplex_adapters WHERE tenant = %s AND name = %s RETURNING {_COLUMNS}",
                (tenant, name),
            )
            removed = sorted((self._record(row) for row in cursor.fetchall()), key=lambda r: r.version)
        if not removed:
            raise KeyError(f"adapter {tenant}/{name} not found")
        for record in removed:
            remove_tree(record.path)  # the local copy
            try:
                self.blobs.delete(self.blobs.key(tenant, name, record.version))
            except StoreUnavailableError as exc:  # unlisted files cost space, not correctness
                logger.warning("deleted %s but kept its files in the bucket: %s", record.adapter_id, exc)
        return removed

    def _next_version(self, tenant: str, name: str) -> int:
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO loraplex_version_counters AS c VALUES (%s, %s, 1) ON CONFLICT (tenant, name) "
                "DO UPDATE SET last_version = c.last_version + 1 RETURNING last_version",
                (tenant, name),
            )
            row = cursor.fetchone()
        return int(row[0])

    def _insert(self, record: AdapterRecord, key: str) -> None:
        with self._transaction() as cursor:
            cursor.execute(
                f"INSERT INTO loraplex_adapters ({_COLUMNS}, blob_key) VALUES ({', '.join(['%s'] * 12)})",
                (record.tenant, record.name, record.version, record.sha256, record.rank, record.alpha,
                 record.use_rslora, list(record.target_modules), record.base_model_name_or_path,
                 record.size_bytes, record.created_at, key),
            )  # fmt: skip

    # ---- reads

    def latest(self, tenant: str, name: str) -> AdapterRecord | None:
        check_names(tenant, name)
        found = self._rows(
            f"SELECT {_COLUMNS} FROM loraplex_adapters WHERE tenant = %(tenant)s AND name = %(name)s "
            "ORDER BY version DESC LIMIT 1",
            {"tenant": tenant, "name": name},
        )
        return found[0] if found else None

    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        check_names(tenant, name)
        found = self._rows(
            f"SELECT {_COLUMNS} FROM loraplex_adapters WHERE tenant = %(tenant)s AND name = %(name)s "
            "AND version = %(version)s",
            {"tenant": tenant, "name": name, "version": version},
        )
        return found[0] if found else None

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        check_names(tenant, name)
        return self._rows(
            f"SELECT {_COLUMNS} FROM loraplex_adapters WHERE tenant = %(tenant)s AND name = %(name)s "
            "ORDER BY version",
            {"tenant": tenant, "name": name},
        )

    def list(self, tenant: str | None = None) -> builtins.list[AdapterRecord]:
        if tenant is not None:
            check_names(tenant)
        return self._rows(_LATEST, {"tenant": tenant})

    # ---- the local disk tier

    def fetch(self, path: Path) -> None:
        """Make the version whose local directory is ``path`` present on disk (bucket → disk)."""
        if all((path / file).is_file() for file in (CONFIG_FILE, WEIGHTS_FILE)):
            return
        relative = Path(os.path.realpath(path)).relative_to(self._local)
        tenant, name, version = relative.parts
        self.blobs.get_dir(self.blobs.key(tenant, name, int(version.removeprefix("v"))), path)

    def _local_dir(self, tenant: str, name: str, version: int) -> Path:
        return self._local / tenant / name / f"v{version}"

    def _keep_local(self, staged: Path, target: Path) -> None:
        """The uploaded files become the local copy (no download for the replica that took them)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # already there, or a race with a download: either is whole
            os.rename(staged, target)


def open_shared_store(database_url: str, blobs_url: str, data_dir: Path,
                      allowed_roots: Sequence[Path] = ()) -> SharedAdapterStore:  # fmt: skip
    """The store behind ``--adapter-store postgresql://... --adapter-blobs s3://...``."""
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise StoreError(f"--adapter-store must be a postgresql:// URL, got {redact(database_url)!r}")
    if allowed_roots:
        logger.warning("--adapter-roots is ignored with a shared adapter store (local dirs are refused)")
    return SharedAdapterStore(database_url, S3Blobs(blobs_url), data_dir)
