"""``loraplex keys``: API keys and their tenants' limits, in the keys file (adapters/tenants.py).

- ``keys add --tenant T [--role user|admin] [--label TEXT] [limits]`` appends a new key's hash and
  prints the key, once, alone on stdout (so ``KEY=$(loraplex keys add ...)`` works);
- ``keys limits --tenant T [limits]`` changes the limits of a tenant that holds a key;
- ``keys list`` shows every key with its tenant's limits.

The limits: ``--max-concurrent N --rpm N --tpm N --weight W``; ``none`` removes a limit (a weight
back to 1). The file is ``--keys-file``, else ``LORAPLEX_KEYS_FILE``; a running server re-reads it
when it changes. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from server.settings import KEYS_FILE, flag_help, keys_file_path

USAGE_ERROR = 2
_LIMIT_FLAGS = {
    "max_concurrent": "generation requests in flight at once (each choice counts)",
    "rpm": "generation requests per minute",
    "tpm": "tokens per minute (prompt + max_tokens at admission, the actual count once done)",
    "weight": "share of the engine under fair scheduling (default 1)",
}


def add_keys_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="create and list API keys (the file stores only hashes)")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a key for a tenant and print it, once, on stdout")
    add.add_argument("--tenant", required=True, help="the tenant the key acts for")
    add.add_argument("--role", default="user", help="user (own tenant) or admin (all tenants); default user")
    add.add_argument("--label", help="a note shown by `keys list`, e.g. who holds the key")
    add.set_defaults(func=keys_add_command)
    limits = actions.add_parser("limits", help="change the limits and weight of a tenant that holds a key")
    limits.add_argument("--tenant", required=True, help="the tenant to change")
    limits.set_defaults(func=keys_limits_command)
    listing = actions.add_parser("list", help="show tenant, role, hash prefix, limits and label of every key")
    listing.set_defaults(func=keys_list_command)
    for action in (add, limits):
        for name, meaning in _LIMIT_FLAGS.items():
            action.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="N|none",
                                help=f"{meaning}; none removes it")  # fmt: skip
    for action in (add, limits, listing):
        summary = flag_help(KEYS_FILE.setting.meaning, is_unset=False)
        action.add_argument(f"--{KEYS_FILE.flag}", help=f"{summary} (env {KEYS_FILE.env})".replace("%", "%%"))


def _limit_changes(args: argparse.Namespace) -> dict[str, object]:
    """The limit flags given, as TenantLimits field values (ValueError for one that is no number)."""
    changes: dict[str, object] = {}
    for name in _LIMIT_FLAGS:
        raw = getattr(args, name)
        if raw is None:
            continue
        try:
            changes[name] = None if raw == "none" else float(raw) if name == "weight" else int(raw)
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')} must be a number or none, got {raw!r}") from None
    return changes


def keys_add_command(args: argparse.Namespace) -> int:
    """Print a new key alone on stdout and where its hash went on stderr; 2 for a bad setting."""
    try:
        from adapters.tenants import add_key  # imports torch (via adapters.format): only when needed

        path = keys_file_path(args, dict(os.environ))
        key = add_key(path, args.tenant, args.role, args.label, _limit_changes(args))
    except (ValueError, OSError) as exc:
        print(f"loraplex keys add: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(key)
    print(
        f"loraplex keys add: stored the hash of a new {args.role} key for tenant {args.tenant!r} in {path}; "
        "the key above is shown only this once", file=sys.stderr,
    )  # fmt: skip
    return 0


def keys_limits_command(args: argparse.Namespace) -> int:
    """Change a tenant's limits; print them as ``keys list`` shows them."""
    try:
        from adapters.tenant_limits import describe
        from adapters.tenants import set_tenant_limits

        changes = _limit_changes(args)
        if not changes:
            raise ValueError("give at least one of --max-concurrent, --rpm, --tpm, --weight")
        limits = set_tenant_limits(keys_file_path(args, dict(os.environ)), args.tenant, changes)
    except (ValueError, OSError) as exc:
        print(f"loraplex keys limits: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(f"{args.tenant}  {describe(limits)}")
    return 0


def keys_list_command(args: argparse.Namespace) -> int:
    """A header, then one line per key: tenant, role, first 8 hex chars of its hash, its tenant's
    limits (or -), label (or -)."""
    try:
        from adapters.tenant_limits import describe
        from adapters.tenants import KeyRing

        ring = KeyRing.load(keys_file_path(args, dict(os.environ)))
    except ValueError as exc:
        print(f"loraplex keys list: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    rows = [("TENANT", "ROLE", "SHA256", "LIMITS", "LABEL")]  # the label last: it is free text
    rows += [
        (
            e.principal.tenant,
            e.principal.role,
            e.sha256[:8],
            describe(ring.limits(e.principal.tenant)),
            e.label or "-",
        )
        for e in ring.entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]]))
    return 0
