"""API keys → tenant and role, and the rules for who may see which adapter.

The keys file is JSON and holds only SHA-256 hashes of the keys::

    {"keys": [{"sha256": "<64 lowercase hex>", "tenant": "acme", "role": "user",
               "label": "optional note", "created_at": "optional ISO time"}],
     "tenants": {"acme": {"max_concurrent": 4, "rpm": 60, "tpm": 20000, "weight": 2}}}

``tenants`` is optional: per-tenant limits and scheduling weight (adapters/tenant_limits.py).

A presented key is hashed and compared in constant time against every entry. Adapter names are
scoped per tenant: ``acme/support-bot`` and ``globex/support-bot`` are different adapters, a user
sees only their own tenant's, an admin sees all. Another tenant's adapter looks exactly like an
unknown name, so existence never leaks.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

from adapters.errors import AdapterFormatError, KeysFileError, UnknownAdapterError
from adapters.format import validate_name
from adapters.tenant_limits import TenantLimits, parse_limits

Role = Literal["user", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
KEY_PREFIX = "lpx-"
MAX_LABEL_LENGTH = 200
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = {"sha256", "tenant", "role"}
_OPTIONAL_FIELDS = {"label", "created_at"}
FileSignature = tuple[int, int, int]  # (inode, mtime_ns, size) of a keys file


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and its role. Construction validates both (ValueError)."""

    tenant: str
    role: Role

    def __post_init__(self) -> None:
        validate_name(self.tenant, "tenant")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SINGLE_TENANT = Principal(tenant="default", role="admin")  # used when no keys file is given
NO_LIMITS = TenantLimits()


@dataclass(frozen=True)
class KeyEntry:
    """One validated line of the keys file (never the key itself)."""

    sha256: str  # 64 lowercase hex chars
    principal: Principal
    label: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class KeysFile:
    """A keys file's validated content."""

    entries: tuple[KeyEntry, ...]
    limits: Mapping[str, TenantLimits]  # by tenant; a tenant missing has NO_LIMITS


def hash_key(key: str) -> str:
    """The lowercase hex SHA-256 of a key's UTF-8 bytes, as stored in the keys file."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def can_see(principal: Principal, tenant: str) -> bool:
    """Admins see every tenant's adapters; users only their own tenant's."""
    return principal.is_admin or principal.tenant == tenant


def parse_model_name(principal: Principal, model: str) -> tuple[str, str]:
    """Resolve an API ``model`` string naming an adapter to ``(tenant, name)``.

    ``"name"`` → ``(principal.tenant, name)``; ``"tenant/name"`` is allowed for admins (any tenant)
    and for a user naming their own tenant. Another tenant (for a user) or an invalid name raises
    UnknownAdapterError, whose message is the one any unknown model gets.
    """
    if not isinstance(model, str):
        raise UnknownAdapterError(model)
    tenant, sep, name = model.rpartition("/")
    if not sep:
        tenant = principal.tenant
    try:
        validate_name(tenant, "tenant")
        validate_name(name)
    except AdapterFormatError:
        raise UnknownAdapterError(model) from None
    if not can_see(principal, tenant):
        raise UnknownAdapterError(model)
    return tenant, name


class KeyRing:
    """The keys of one keys file, reloadable while the server runs; safe to share across threads."""

    def __init__(self, path: Path, keys: KeysFile, signature: FileSignature | None) -> None:
        self.path = path
        self._keys = keys  # one tuple, swapped whole by a reload
        self._signature = signature  # (inode, mtime_ns, size) of the file last read or tried

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Read and validate ``path``; KeysFileError naming the file (and entry index) if it is bad."""
        path = Path(path)
        keys, signature = _read_keys_file(path)
        return cls(path, keys, signature)

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return self._keys.entries

    @property
    def tenant_limits(self) -> Mapping[str, TenantLimits]:
        """The tenants the file gives limits or a weight (others have the defaults)."""
        return self._keys.limits

    def limits(self, tenant: str) -> TenantLimits:
        return self._keys.limits.get(tenant, NO_LIMITS)

    def __len__(self) -> int:
        return len(self._keys.entries)

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal whose entry holds the hash of ``key``; None for an unknown, empty or None key.

        The hash is compared with ``hmac.compare_digest`` against every entry, with no early exit,
        so the time taken does not reveal which entry matched.
        """
        if not key:
            return None
        digest = hash_key(key)
        found: Principal | None = None
        for entry in self.entries:  # one snapshot: a concurrent reload swaps the whole tuple
            if hmac.compare_digest(digest, entry.sha256) and found is None:
                found = entry.principal
        return found

    def reload(self) -> None:
        """Re-read the file; on KeysFileError the keys loaded before stay in effect."""
        self._signature = _signature(self.path)
        self._keys, self._signature = _read_keys_file(self.path)

    def maybe_reload(self) -> bool:
        """Reload if the file's inode, mtime or size changed since the last read; True if it did.

        Raises KeysFileError (old keys kept) once per change to a bad or missing file, not on every
        later call, so a periodic check does not flood the log.
        """
        if _signature(self.path) == self._signature:
            return False
        self.reload()
        return True


def add_key(path: str | Path, tenant: str, role: Role = "user", label: str | None = None,
            limits: Mapping[str, object] | None = None) -> str:  # fmt: skip
    """Append a new key's hash to the keys file and return the key, which is never stored.

    Creates the file (mode 0600) if missing. The rewrite is atomic (temp file in the same
    directory, fsync, ``os.replace``) and happens under an exclusive ``flock`` on ``<path>.lock``,
    so concurrent calls from threads or processes all land. ``limits``: changes to the tenant's
    limits (as ``set_tenant_limits``), made in the same rewrite. ValueError for a bad tenant, role,
    label or limit; KeysFileError if the existing file is malformed (it is left untouched).
    """
    path = Path(path)
    principal = Principal(tenant=tenant, role=role)
    label = _check_label(label, "label")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"sha256": hash_key(key), "tenant": principal.tenant, "role": principal.role}
    if label is not None:
        entry["label"] = label
    entry["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with _editing(path) as document:
        document["keys"].append(entry)
        if limits:
            _change_limits(document, principal.tenant, limits)
    return key


def set_tenant_limits(path: str | Path, tenant: str, changes: Mapping[str, object]) -> TenantLimits:
    """Change a tenant's limits in the keys file and return them; a limit changed to None is removed.

    The tenant must hold a key there (ValueError otherwise, as for a bad field or value). Written as
    ``add_key`` writes; a running server picks the change up when it reloads the file.
    """
    path = Path(path)
    validate_name(tenant, "tenant")
    with _editing(path) as document:
        if not any(entry.get("tenant") == tenant for entry in document["keys"]):
            raise ValueError(
                f"tenant {tenant!r} has no key in {str(path)!r}: add one with `loraplex keys add`"
            )
        return _change_limits(document, tenant, changes)


def _change_limits(document: dict[str, Any], tenant: str, changes: Mapping[str, object]) -> TenantLimits:
    tenants = document.setdefault("tenants", {})
    limits = parse_limits(tenants.get(tenant, {})).changed(changes)
    if limits.is_default:
        tenants.pop(tenant, None)
    else:
        tenants[tenant] = limits.to_json()
    if not tenants:
        del document["tenants"]
    return limits


@contextmanager
def _editing(path: Path) -> Iterator[dict[str, Any]]:
    """The keys file's document, under the lock, written back atomically when the block ends without
    raising and parses (a bad edit raises KeysFileError and the file is left untouched)."""
    with _exclusive_lock(path):
        document = _read_document(path)[0] if path.exists() else {"keys": []}
        _parse_document(document, path)  # never rewrite a file we could not load
        assert isinstance(document, dict)  # _parse_document checked it is
        yield document
        _parse_document(document, path)
        _write_atomically(path, json.dumps(document, indent=2) + "\n")


def _signature(path: Path) -> FileSignature | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _read_keys_file(path: Path) -> tuple[KeysFile, FileSignature]:
    """Validated entries plus the signature of the very file they were read from."""
    document, signature = _read_document(path)
    return _parse_document(document, path), signature


def _read_document(path: Path) -> tuple[object, FileSignature]:
    """The parsed JSON of ``path`` and its (inode, mtime_ns, size); KeysFileError if unreadable."""
    try:
        with path.open("rb") as file:
            stat = os.fstat(file.fileno())
            raw = file.read()
    except OSError as exc:
        raise KeysFileError(f"keys file {str(path)!r}: cannot be read: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"keys file {str(path)!r}: not valid JSON: {exc}") from None
    return document, (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _parse_document(document: object, path: Path) -> KeysFile:
    """Validate a parsed keys file: an object with a "keys" list of valid entries and optionally a
    "tenants" object of valid limits."""
    where = f"keys file {str(path)!r}"
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysFileError(f'{where}: must be a JSON object with a "keys" list')
    if unknown := sorted(set(document) - {"keys", "tenants"}):
        raise KeysFileError(f"{where}: unknown top-level fields {unknown}")
    return KeysFile(
        _parse_entries(document["keys"], where), _parse_tenants(document.get("tenants", {}), where)
    )


def _parse_tenants(raw: object, where: str) -> dict[str, TenantLimits]:
    if not isinstance(raw, dict):
        raise KeysFileError(f'{where}: "tenants" must be a JSON object')
    limits = {}
    for tenant, fields in raw.items():
        try:
            validate_name(tenant, "tenant")
            limits[tenant] = parse_limits(fields)
        except ValueError as exc:
            raise KeysFileError(f"{where}: tenants[{tenant!r}]: {exc}") from None
    return limits


def _parse_entries(raw_entries: list[object], where: str) -> tuple[KeyEntry, ...]:
    entries: list[KeyEntry] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_entries):
        entry = _parse_entry(raw, f"{where}: keys[{index}]")
        if entry.sha256 in first_index:
            raise KeysFileError(
                f"{where}: keys[{index}]: sha256 duplicates keys[{first_index[entry.sha256]}]"
            )
        first_index[entry.sha256] = index
        entries.append(entry)
    return tuple(entries)


def _parse_entry(raw: object, where: str) -> KeyEntry:
    """One entry: sha256, tenant and role required; label and created_at optional; nothing else."""
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where}: must be a JSON object")
    if missing := sorted(_ENTRY_FIELDS - set(raw)):
        raise KeysFileError(f"{where}: missing fields {missing}")
    if unknown := sorted(set(raw) - _ENTRY_FIELDS - _OPTIONAL_FIELDS):
        raise KeysFileError(f"{where}: unknown fields {unknown}")
    sha256 = raw["sha256"]
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex characters")
    try:
        principal = Principal(tenant=raw["tenant"], role=raw["role"])
        label = _check_label(raw.get("label"), "label")
        created_at = _check_label(raw.get("created_at"), "created_at")
    except ValueError as exc:
        raise KeysFileError(f"{where}: {exc}") from None
    return KeyEntry(sha256=sha256, principal=principal, label=label, created_at=created_at)


def _check_label(value: object, what: str) -> str | None:
    """None, or a string of at most MAX_LABEL_LENGTH printable characters (it is shown in listings)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_LENGTH or not value.isprintable():
        raise ValueError(f"{what} must be a string of at most {MAX_LABEL_LENGTH} printable characters")
    return value


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``<path>.lock``; each call opens its own descriptor, so threads
    of one process exclude each other as processes do. The lock file is never removed (that would
    let two holders lock different inodes)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: readers see the old or the new file, never a partial one.

    A new file gets mode 0600; an existing file keeps its mode.
    """
    mode = os.stat(path).st_mode & 0o777 if path.exists() else 0o600
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
