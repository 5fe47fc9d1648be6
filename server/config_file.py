"""The ``loraplex serve --config`` file: TOML (name ending in ``.toml``) or JSON, keyed by flag name.

Reading it never raises anything but ``ValueError`` with a one-line message, so ``loraplex serve``
prints one line and exits with status 2 for a file that is missing, unreadable, not UTF-8, does not
parse, or is TOML on a Python without ``tomllib`` (3.10) and without the ``tomli`` backport.

Values keep their parsed types here; ``config_text`` then turns one into the text its flag would
take, and refuses a list or table where the option takes one value (rather than passing on
Python's ``"['a', 'b']"``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path


def load_config_file(path: str | None, known: Collection[str]) -> dict[str, object]:
    """{flag: value} from the file at ``path`` ({} for no path); keys may use dashes or underscores.

    ValueError for a file that cannot be read or parsed, a key given twice (``max-loras`` and
    ``max_loras``), or a key not in ``known``.
    """
    if not path:
        return {}
    try:
        text = Path(path).read_text()
        raw = _parse_toml(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise ValueError(f"--config {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: must hold a table/object of flag = value")
    values: dict[str, object] = {}
    for key, value in raw.items():
        flag = str(key).replace("_", "-")
        if flag in values:
            raise ValueError(f"--config {path}: key {flag} is given twice")
        values[flag] = value
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)}")
    return values


def _parse_toml(text: str) -> dict[str, object]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError(
                "reading TOML needs Python 3.11+ or the tomli package (pip install tomli); "
                "or write the settings as JSON"
            ) from None
    return tomllib.loads(text)


def config_text(flag: str, value: object, is_list: bool) -> str | None:
    """A config-file value as the text its flag would take; ValueError naming the key otherwise.

    Strings and numbers are read like the flag (``max-loras = 16`` is ``--max-loras 16``), booleans
    as ``true``/``false``, null as unset. A multi-valued option (``is_list``: comma-separated as a
    flag or env var) also takes a list of strings, joined with commas as its env var would hold
    them; an item holding a comma is refused, since it would be split. Lists and tables for any
    other option are refused.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if is_list and isinstance(value, list) and all(isinstance(item, str) for item in value):
        with_comma = [item for item in value if "," in item]
        if with_comma:
            raise ValueError(f"config key {flag}: {with_comma[0]!r} holds a comma, which separates items")
        return ",".join(value)
    expected = "a string or a list of strings" if is_list else "a single value"
    raise ValueError(f"config key {flag}: expected {expected}, got {_kind(value)} {value!r}")


def config_adapters(value: object) -> list[str]:
    """The ``adapter`` key as NAME=PATH specs: a table NAME = "PATH", a list of "NAME=PATH", or one
    "a=/x,b=/y" string split like ``LORAPLEX_ADAPTER``; ValueError naming the key for anything else.
    """
    if isinstance(value, str):
        return [spec for spec in value.split(",") if spec.strip()]
    if isinstance(value, list) and all(isinstance(spec, str) for spec in value):
        return value
    if isinstance(value, dict) and all(isinstance(path, str) for path in value.values()):
        return [f"{name}={path}" for name, path in value.items()]
    raise ValueError(
        'config key adapter: expected a table of NAME = "PATH", a list of "NAME=PATH" strings or one '
        f'"NAME=PATH,..." string, got {_kind(value)} {value!r}'
    )


def _kind(value: object) -> str:
    return {dict: "a table", list: "a list"}.get(type(value), f"a {type(value).__name__}")
