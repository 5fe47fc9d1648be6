"""Durable adapter storage: versioned adapter directories on disk plus a SQLite (WAL) metadata database.

Layout under ``data_dir``::

    loraplex.sqlite3                  one row per adapter version, one counter per (tenant, name)
    adapters/<tenant>/<name>/v<N>/    uploaded versions: adapter_config.json + adapter_model.safetensors
    staging/<token>/ + <token>.lock   uploads being written; a flock on the .lock marks them as live

Crash safety: a version directory is complete and fsynced before it is renamed into place, and it is
renamed before its row commits, all under SQLite's write lock. A kill at any point therefore leaves
either no row (the directory is an orphan, removed at the next open) or a row whose files are whole.
Version numbers come from a counter that survives deletes, so an adapter id is never reused.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters.errors import AdapterFormatError, StoreError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, LoRAConfig, content_key, validate_name

logger = logging.getLogger(__name__)

DB_FILE = "loraplex.sqlite3"
_BUSY_TIMEOUT_S = 30.0
_VERSION_DIR = re.compile(r"v[1-9][0-9]*")
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
    rank INTEGER NOT NULL, alpha REAL NOT NULL, use_rslora INTEGER NOT NULL, target_modules TEXT NOT NULL,
    base_model_name_or_path TEXT, size_bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    path TEXT NOT NULL, source TEXT NOT NULL CHECK (source IN ('upload', 'local')),
    PRIMARY KEY (tenant, name, version))""",
    # the highest version ever used per name; it survives deletes so that an adapter id is never reused
    """CREATE TABLE IF NOT EXISTS version_counters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL, PRIMARY KEY (tenant, name))""",
)
_COLUMNS = (
    "tenant, name, version, sha256, rank, alpha, use_rslora, target_modules, "
    "base_model_name_or_path, size_bytes, created_at, path, source"
)


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    version: int  # 1, 2, 3… per (tenant, name); never reused, even after a delete
    sha256: str  # hex sha256 of the adapter_model.safetensors bytes
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    size_bytes: int  # config + weights file sizes
    created_at: float  # unix seconds
    path: Path  # directory holding adapter_config.json + adapter_model.safetensors
    source: str  # "upload" or "local"

    @property
    def adapter_id(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"

    @property
    def content_key(self) -> str:
        """What this version computes (``adapters.format.content_key``): equal for equal content."""
        return content_key(self.sha256, self.rank, self.alpha, self.use_rslora)


class AdapterStore(Protocol):
    """Where adapter versions live: SQLite + local disk (this file), or PostgreSQL + an S3-compatible
    bucket shared by replicas (``adapters/shared_store.py``).

    Tenant and adapter names must pass ``validate_name``; bad ones raise StoreError. A shared
    store raises StoreUnavailableError when its database or bucket cannot be reached.
    """

    shared: bool  # other processes change the catalogue: readers must ask, not trust what they saw

    def staging_dir(self) -> AbstractContextManager[Path]:
        """An empty directory on the store's filesystem, removed on exit whatever happens."""

    def commit(self, tenant: str, name: str, staged: Path, config: LoRAConfig) -> AdapterRecord:
        """Move a staged dir (validated by the caller) in atomically as the next version of the name."""

    def register_local(self, tenant: str, name: str, path: Path, config: LoRAConfig) -> AdapterRecord:
        """Record a directory in place (source "local", not copied) once ``check_local_path`` passes."""

    def check_local_path(self, path: str | Path) -> Path:
        """The real path of an admin-given adapter dir; StoreError unless it lies in an allowed root."""

    def latest(self, tenant: str, name: str) -> AdapterRecord | None:
        """The highest stored version of the name, or None."""

    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        """That version of the name, or None."""

    def versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of the name, oldest first; [] if none."""

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        """The latest version of each name, sorted by (tenant, name); ``None`` lists every tenant."""

    def delete(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:  # ``list`` is the method above
        """Remove every version (metadata, then uploaded files; local dirs stay); KeyError if unknown."""

    def fetch(self, path: Path) -> None:
        """Make a record's ``path`` present on local disk (a shared store downloads it); may block."""


def check_names(tenant: str, name: str | None = None) -> None:
    try:
        validate_name(tenant, "tenant")
        if name is not None:
            validate_name(name)
    except AdapterFormatError as exc:
        raise StoreError(str(exc)) from exc


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adapter_files(directory: Path) -> tuple[Path, Path]:
    """(config, weights) of ``directory``; StoreError if either is missing or a symlink."""
    files = (directory / CONFIG_FILE, directory / WEIGHTS_FILE)
    for file in files:
        if file.is_symlink():
            raise StoreError(f"{file} is a symlink; symlinks are refused")
        if not file.is_file():
            raise StoreError(f"{file.name} not found in {directory}")
    return files


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, as ``sha256sum`` prints it; O_NOFOLLOW refuses a swapped-in link."""
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(files: tuple[Path, Path]) -> tuple[str, int]:
    """(sha256 of the weights, total bytes) of (config, weights)."""
    return file_sha256(files[1]), sum(file.stat().st_size for file in files)


def remove_tree(path: Path) -> None:
    """rm -rf ``path`` (a symlink itself is unlinked, never followed)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class SQLiteAdapterStore:
    """The default AdapterStore: one SQLite database and a directory tree under ``data_dir``.

    Thread-safe (one connection behind a lock) and safe across processes sharing ``data_dir``
    (SQLite's write lock orders commits; flocks keep live staging dirs from being swept).
    ``problems`` lists rows found at open whose files are missing; it should stay empty.
    """

    shared = False

    def __init__(self, data_dir: Path, allowed_roots: Sequence[Path] = ()) -> None:
        self.data_dir = Path(os.path.realpath(data_dir))
        self.allowed_roots = tuple(Path(os.path.realpath(root)) for root in allowed_roots)
        self.problems: list[str] = []
        self._adapters, self._staging = self.data_dir / "adapters", self.data_dir / "staging"
        for directory in (self._adapters, self._staging):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.data_dir / DB_FILE, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every COMMIT
        with self._write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: holds the thread lock and SQLite's write lock; rolls back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # ---- staging and startup recovery

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        while True:
            token = uuid.uuid4().hex
            lock_path = self._staging / f"{token}.lock"
            lock = open(lock_path, "a")  # noqa: SIM115 - held for the whole `with`, closed below
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino:
                    break
            lock.close()  # another process's sweep unlinked it before we locked it: take a new one
        path = self._staging / token
        try:
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            lock.close()

    def _sweep_staging(self) -> None:
        """Remove staging dirs whose owner is gone: nobody holds the flock on their lock file."""
        for token in {entry.name.removesuffix(".lock") for entry in os.scandir(self._staging)}:
            lock_path = self._staging / f"{token}.lock"
            with open(lock_path, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # live: a staging dir of another store object or process
                remove_tree(self._staging / token)
                lock_path.unlink(missing_ok=True)

    def _recover(self) -> None:
        """Sweep dead staging dirs, remove version dirs that never committed, report missing files."""
        self._sweep_staging()
        with self._write() as db:  # under the write lock, no commit is between its rename and COMMIT
            rows = db.execute("SELECT tenant, name, version, path, source FROM adapters").fetchall()
            committed = {self.data_dir / path for *_, path, source in rows if source == "upload"}
            for version_dir in self._adapters.glob("*/*/v*"):
                if _VERSION_DIR.fullmatch(version_dir.name) and version_dir not in committed:
                    logger.warning("removing %s: a version directory that never committed", version_dir)
                    remove_tree(version_dir)
            self._prune_empty_dirs([*self._adapters.glob("*/*"), *self._adapters.glob("*")])
        for tenant, name, version, path, _ in rows:
            if not all((self.data_dir / path / file).is_file() for file in (CONFIG_FILE, WEIGHTS_FILE)):
                self.problems.append(f"{tenant}/{name}@{version}: files missing in {self.data_dir / path}")
                logger.error("adapter store: %s", self.problems[-1])

    @staticmethod
    def _prune_empty_dirs(directories: list[Path]) -> None:
        """rmdir those that are empty, in order; call in a write transaction (commit creates them)."""
        for directory in directories:
            with contextlib.suppress(OSError):
                directory.rmdir()

    # ---- writes

    def commit(self, tenant: str, name: str, staged: Path, config: LoRAConfig) -> AdapterRecord:
        check_names(tenant, name)
        staged = Path(staged)
        if staged.parent != self._staging or staged.is_symlink() or not staged.is_dir():
            raise StoreError(f"{staged} is not a staging dir of this store (use staging_dir())")
        files = adapter_files(staged)
        for file in files:
            _fsync(file)
        _fsync(staged, directory=True)
        digest = files_digest(files)
        with self._write() as db:
            version = self._next_version(db, tenant, name)
            final = self._adapters / tenant / name / f"v{version}"
            self._make_dirs(final.parent)
            remove_tree(final)  # left by a crash between rename and COMMIT in another process: never acked
            os.rename(staged, final)
            try:
                _fsync(final.parent, directory=True)
                return self._insert(db, tenant, name, version, digest, config, final, "upload")
            except BaseException:
                remove_tree(final)
                raise

    def register_local(self, tenant: str, name: str, path: Path, config: LoRAConfig) -> AdapterRecord:
        check_names(tenant, name)
        directory = self.check_local_path(path)
        digest = files_digest(adapter_files(directory))
        with self._write() as db:
            version = self._next_version(db, tenant, name)
            return self._insert(db, tenant, name, version, digest, config, directory, "local")

    def delete(self, tenant: str, name: str) -> list[AdapterRecord]:
        check_names(tenant, name)
        with self._write() as db:
            removed = self._select(db, "WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name))
            if not removed:
                raise KeyError(f"adapter {tenant}/{name} not found")
            db.execute("DELETE FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
        for record in removed:
            if record.source == "upload":  # a crash here leaves orphans, which the next open removes
                remove_tree(record.path)
        with self._write():
            self._prune_empty_dirs([self._adapters / tenant / name, self._adapters / tenant])
        return removed

    @staticmethod
    def _next_version(db: sqlite3.Connection, tenant: str, name: str) -> int:
        db.execute(  # an upsert (SQLite >= 3.24); RETURNING would need 3.35, newer than some distros ship
            "INSERT INTO version_counters VALUES (?, ?, 1) "
            "ON CONFLICT (tenant, name) DO UPDATE SET last_version = last_version + 1",
            (tenant, name),
        )
        query = "SELECT last_version FROM version_counters WHERE tenant = ? AND name = ?"
        version: int = db.execute(query, (tenant, name)).fetchone()[0]
        return version

    def _make_dirs(self, directory: Path) -> None:
        """mkdir -p below adapters/, fsyncing each parent that gains an entry."""
        for parent in reversed((directory, *directory.parents)):
            if parent.is_relative_to(self._adapters) and not parent.exists():
                parent.mkdir()
                _fsync(parent.parent, directory=True)

    def _insert(
        self,
        db: sqlite3.Connection,
        tenant: str,
        name: str,
        version: int,
        digest: tuple[str, int],
        config: LoRAConfig,
        path: Path,
        source: str,
    ) -> AdapterRecord:
        values = (
            tenant, name, version, digest[0], config.rank, float(config.alpha), bool(config.use_rslora),
            tuple(config.target_modules), config.base_model_name_or_path, digest[1], time.time(),
        )  # fmt: skip
        stored_path = path.relative_to(self.data_dir) if source == "upload" else path  # data_dir may move
        db.execute(
            f"INSERT INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",
            (*values[:7], json.dumps(values[7]), *values[8:], str(stored_path), source),
        )
        return AdapterRecord(*values, path, source)

    # ---- reads

    def _select(self, db: sqlite3.Connection, where: str, params: tuple[object, ...]) -> list[AdapterRecord]:
        rows = db.execute(f"SELECT {_COLUMNS} FROM adapters a {where}", params).fetchall()
        return [
            AdapterRecord(t, n, v, sha, rank, alpha, bool(rs), tuple(json.loads(tm)), base, size, at,
                          self.data_dir / path, source)
            for t, n, v, sha, rank, alpha, rs, tm, base, size, at, path, source in rows
        ]  # fmt: skip

    def _read(self, where: str, *params: object) -> list[AdapterRecord]:
        with self._lock:
            return self._select(self._db, where, params)

    def latest(self, tenant: str, name: str) -> AdapterRecord | None:
        check_names(tenant, name)
        found = self._read("WHERE tenant = ? AND name = ? ORDER BY version DESC LIMIT 1", tenant, name)
        return found[0] if found else None

    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        check_names(tenant, name)
        found = self._read("WHERE tenant = ? AND name = ? AND version = ?", tenant, name, version)
        return found[0] if found else None

    def versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        check_names(tenant, name)
        return self._read("WHERE tenant = ? AND name = ? ORDER BY version", tenant, name)

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        if tenant is not None:
            check_names(tenant)
        return self._read(
            "WHERE (?1 IS NULL OR tenant = ?1) AND version = (SELECT MAX(version) FROM adapters b "
            "WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY tenant, name",
            tenant,
        )

    # ---- the disk tier: every version is on local disk already

    def fetch(self, path: Path) -> None:
        pass

    # ---- local directories

    def check_local_path(self, path: str | Path) -> Path:
        """Resolve ``path`` or raise StoreError saying why it is refused.

        Refused: no roots configured, a relative path, a symlink anywhere on the path (its realpath
        must equal its absolute path), a path outside every root or inside the store's data dir, and
        a symlinked or missing adapter file.
        """
        if not self.allowed_roots:
            raise StoreError("registering local directories is disabled: no allowed roots are configured")
        if not os.path.isabs(path):
            raise StoreError(f"local adapter path {str(path)!r} must be absolute")
        absolute, real = Path(os.path.abspath(path)), Path(os.path.realpath(path))
        if absolute != real:
            raise StoreError(f"local adapter path {absolute} goes through a symlink; symlinks are refused")
        if not real.is_dir():
            raise StoreError(f"local adapter path {real} is not a directory")
        if not any(real.is_relative_to(root) for root in self.allowed_roots):
            roots = ", ".join(str(root) for root in self.allowed_roots)
            raise StoreError(f"local adapter path {real} is outside the allowed roots ({roots})")
        if real.is_relative_to(self.data_dir):
            raise StoreError(f"local adapter path {real} is inside the store's data directory")
        adapter_files(real)
        return real
