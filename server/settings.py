"""``loraplex serve`` settings: flags, env vars and config file → the frozen configs.

Every setting is declared once, on its field in ``server/config.py`` (``setting(...)``); the two
flags that are no config field, ``--adapter`` and ``--config``, are declared here (``EXTRA_FLAGS``).
From a field ``max_loras`` follow its flag ``--max-loras``, its env var ``LORAPLEX_MAX_LORAS``, its
config-file key ``max-loras``, its type (the annotation, None aside), its default and its
``--help`` (``flag_help``); ``SERVE_OPTIONS`` lists the fields that have a flag, ``UNFLAGGED`` the
ones only Python callers set. ``configuration_tables`` renders docs/operations.md's tables from
the same declarations (``python -m server.settings --markdown`` prints them), and
``settings_echo`` gives ``GET /v1/stats`` the values a server runs with.

``resolve_options`` takes each setting from its flag, else ``LORAPLEX_<FLAG>`` (an empty value
counts as unset; ``LORAPLEX_ADAPTER=a=/x,b=/y`` for several adapters), else the ``--config`` file
(read by ``server/config_file.py``), else its default. ``build_configs`` then builds the frozen
``ModelConfig``, ``EngineConfig`` and ``ServerConfig``, which check the ranges. Every failure is a
``ValueError`` with a one-line message, which ``server/cli.py`` prints before exiting with status 2.

Torch-free, like ``server/cli.py``: ``loraplex --help`` and ``loraplex keys`` never import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.urls import redact
from server.config import SETTING, EngineConfig, ModelConfig, ProcessConfig, ServerConfig, Setting
from server.config_file import config_adapters, config_text, load_config_file

ENV_PREFIX = "LORAPLEX_"
SERVE_CONFIGS = (ModelConfig, ProcessConfig, EngineConfig, ServerConfig)  # in --help's and the docs' order
TYPE_NAMES = {str: "str", int: "int", float: "float", Path: "path", tuple: "tuple"}  # the docs' type column
MiB, GiB = 1024**2, 1024**3


@dataclass(frozen=True)
class Option:
    """One declared setting: a field of a config dataclass and its ``Setting``."""

    name: str  # the field's, e.g. max_loras
    config: type  # the dataclass holding the field
    type: Callable[[str], object]  # converts the flag's text: the annotation without its None
    default: object
    setting: Setting

    @classmethod
    def of(cls, config: type, field: dataclasses.Field) -> Option:
        """The option of ``config``'s ``field``; TypeError for a field not declared with ``setting()``."""
        if SETTING not in field.metadata:
            raise TypeError(f"{config.__name__}.{field.name} is not declared with server.config.setting()")
        hint = typing.get_type_hints(config)[field.name]
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
        kind = typing.get_origin(kinds[0]) or kinds[0]
        return cls(field.name, config, kind, field.default, field.metadata[SETTING])

    @property
    def flag(self) -> str:  # without the leading dashes; also the config-file key
        return self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def help(self) -> str:
        """The flag's description: the meaning's summary, plus what ``none`` means for no default."""
        return flag_help(self.setting.meaning, is_unset=self.default in (None, ""))


@dataclass(frozen=True)
class ExtraFlag:
    """A ``loraplex serve`` flag that is no config field."""

    flag: str
    type_name: str  # the docs' type column
    metavar: str
    meaning: str  # Markdown, as a ``Setting``'s
    config_key: str | None  # None: the config file cannot set it
    is_repeatable: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.replace("-", "_").upper()

    @property
    def help(self) -> str:
        return flag_help(self.meaning, is_unset=False)


SETTINGS = tuple(Option.of(config, field) for config in SERVE_CONFIGS for field in dataclasses.fields(config))
SERVE_OPTIONS = tuple(option for option in SETTINGS if option.setting.has_flag)
UNFLAGGED = tuple(option for option in SETTINGS if not option.setting.has_flag)
KEYS_FILE = next(option for option in SERVE_OPTIONS if option.flag == "keys-file")
ADAPTER = ExtraFlag(
    "adapter", "NAME=PATH, repeatable", "NAME=PATH",
    "serve a peft directory in place as model `NAME` (`TENANT/NAME` for a tenant other than `default`), "
    "repeatable (the env var: `a=/x,b=/y`); a restart with the same files adds no version. The file "
    'takes a table of `NAME = "PATH"`, a list of `"NAME=PATH"` or the env var\'s string; flags or the env '
    "var replace the file's adapters, they do not add to them",
    config_key="adapter", is_repeatable=True,
)  # fmt: skip
CONFIG = ExtraFlag(
    "config", "path", "FILE",
    "a TOML (name ending in `.toml`) or JSON file of settings keyed by flag name (`max-loras = 16`), "
    "which flags and env vars override. Its format is below the table",
    config_key=None,
)  # fmt: skip
EXTRA_FLAGS = (ADAPTER, CONFIG)


def flag_help(meaning: str, is_unset: bool) -> str:
    """Plain text for ``--help``: the meaning's first clause, and its ``none:`` clause if ``is_unset``.

    Clauses end at ``; `` or ``. `` outside parentheses; Markdown code ticks and links are dropped.
    """
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", meaning).replace("`", "")
    clauses, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ";." and text[i + 1 : i + 2] == " ":
            clauses.append(text[start:i])
            start = i + 2
    clauses.append(text[start:])
    none = [clause for clause in clauses[1:] if clause.startswith("none:")] if is_unset else []
    return "; ".join(clauses[:1] + none[:1])


def range_help(cell: str) -> str:
    """A range cell as ``--help`` words: ``in [1, 256]``, ``>= 0``, ``one of auto, off``; "" for ``—``."""
    plain = cell.replace("`", "")
    if cell == "—":
        return ""
    if plain[:1] in "[(":
        return f"in {plain}"
    return f"one of {plain}" if cell.count("`") > 2 else plain


def human(value: object) -> str:
    """``2147483648 (2 GiB)``: byte counts get their size in GiB or MiB when they are whole."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= MiB:
        for unit, size in (("GiB", GiB), ("MiB", MiB)):
            if value % size == 0:
                return f"{value} ({value // size} {unit})"
    return str(value)


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, object]:
    """Each option from its flag, else its env var, else the --config file, else its default.

    Keyed by field name (``max_loras``), plus ``adapters`` ({name: path}). Raises ValueError naming
    the flag, env var or file key for a value that does not convert.
    """
    known = [option.flag for option in SERVE_OPTIONS] + [ADAPTER.flag]
    config = load_config_file(getattr(args, "config", None) or environ.get(CONFIG.env), known)
    values = {option.dest: _resolve(option, args, environ, config) for option in SERVE_OPTIONS}
    adapters = args.adapter or [a for a in environ.get(ADAPTER.env, "").split(",") if a.strip()]
    if not adapters and config.get(ADAPTER.flag) is not None:
        adapters = config_adapters(config[ADAPTER.flag])
    values["adapters"] = parse_adapters(adapters)
    return values


def _resolve(option: Option, args: argparse.Namespace, environ: Mapping[str, str],
             config: dict[str, object]) -> object:  # fmt: skip
    raw, source = getattr(args, option.dest), f"--{option.flag}"
    if raw is None and environ.get(option.env):
        raw, source = environ[option.env], option.env
    if raw is None and option.flag in config:
        raw = config_text(option.flag, config[option.flag], is_list=option.setting.is_list)
        source = f"config key {option.flag}"
    try:
        return option.default if raw is None else option.type(raw)
    except ValueError:
        raise ValueError(f"{source}: invalid {option.type.__name__} value {raw!r}") from None


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``["name=path", ...]`` → {name: path}; ValueError for a malformed or repeated name."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.strip().partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter must be NAME=PATH, got {spec!r}")
        if name.strip() in adapters:
            raise ValueError(f"--adapter name {name.strip()!r} is given twice")
        adapters[name.strip()] = path.strip()
    return adapters


def build_configs(options: Mapping[str, object]) -> tuple[ModelConfig, EngineConfig, ServerConfig]:
    """The frozen configs from resolved options; ValueError for a value out of range."""
    return _build(ModelConfig, options), _build(EngineConfig, options), _build(ServerConfig, options)


def _build(config: type, options: Mapping[str, object]):
    return config(
        **{option.name: options[option.name] for option in SERVE_OPTIONS if option.config is config}
    )


def settings_echo(model_config: ModelConfig, engine_config: EngineConfig, server_config: ServerConfig,
                  options: Mapping[str, object]) -> dict[str, object]:  # fmt: skip
    """Every declared setting's value, keyed by its flag's spelling (the config key), JSON-ready.

    Config fields come from the configs, ``ProcessConfig``'s and ``adapter`` ({name: path}) from
    ``options`` (``resolve_options``' dict; a missing one is its default). None is the documented
    computed default (``dtype`` none: measured at start). Paths are strings, tuples lists; the
    settings without a flag (``kv-block-size``, ...) are there too.
    """
    configs = {ModelConfig: model_config, EngineConfig: engine_config, ServerConfig: server_config}
    echo: dict[str, object] = {}
    for option in SETTINGS:
        config = configs.get(option.config)
        value = options.get(option.name, option.default) if config is None else getattr(config, option.name)
        echo[option.flag] = list(value) if isinstance(value, tuple) else _json(value)
    echo[ADAPTER.flag] = {name: str(path) for name, path in dict(options.get("adapters", {})).items()}
    if echo.get("adapter-store"):
        echo["adapter-store"] = redact(str(echo["adapter-store"]))  # never show a password
    return echo


def _json(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def configuration_tables() -> tuple[str, str]:
    """docs/operations.md's two Configuration tables, as Markdown: the flags, then the unflagged."""
    rows = ["| flag | env var | config key | type | default | range | meaning |", "| --- " * 7 + "|"]
    for option in SERVE_OPTIONS:
        cells = (f"`--{option.flag}`", f"`{option.env}`", f"`{option.flag}`", TYPE_NAMES[option.type],
                 _default_cell(option.default), option.setting.range, option.setting.meaning)  # fmt: skip
        rows.append(f"| {' | '.join(cells)} |")
    for extra in EXTRA_FLAGS:
        key = f"`{extra.config_key}`" if extra.config_key else "—"
        cells = (f"`--{extra.flag}`", f"`{extra.env}`", key, extra.type_name, "none", "—", extra.meaning)
        rows.append(f"| {' | '.join(cells)} |")
    unflagged = ["| setting | default | range | meaning |", "| --- " * 4 + "|"]
    for option in UNFLAGGED:
        cells = (
            f"`{option.name}`",
            _default_cell(option.default),
            option.setting.range,
            option.setting.meaning,
        )
        unflagged.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows), "\n".join(unflagged)


def _default_cell(value: object) -> str:
    if value in (None, ""):
        return "none"
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value)
    return f"`{value}`{human(value).removeprefix(str(value))}"  # `2147483648` (2 GiB)


def keys_file_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    """``--keys-file``, else ``LORAPLEX_KEYS_FILE``; ValueError if neither is given."""
    raw = args.keys_file or environ.get(KEYS_FILE.env)
    if not raw:
        raise ValueError(f"no keys file: pass --{KEYS_FILE.flag} PATH or set {KEYS_FILE.env}")
    return KEYS_FILE.type(raw)


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """``--data-dir`` when nothing sets it: ``$XDG_DATA_HOME/loraplex``, else ``~/.local/share/loraplex``."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loraplex"


def parse_adapter_roots(text: str) -> list[Path]:
    """``"/a, ~/b"`` → [Path("/a"), Path.home() / "b"], resolved; spaces around a comma are not a path's."""
    return [Path(root.strip()).expanduser().resolve() for root in text.split(",") if root.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.settings --markdown``: print the Configuration tables of docs/operations.md."""
    parser = argparse.ArgumentParser(prog="python -m server.settings", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", required=True, help="print the two tables")
    parser.parse_args(argv)
    print("\n\n".join(configuration_tables()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
