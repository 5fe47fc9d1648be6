"""``loraplex serve`` settings: flags, env vars and config file → the frozen configs.

``SERVE_OPTIONS`` lists every serve option: its flag, the type its text converts with, its
default (None: the config field's default) and its help. ``resolve_options`` takes each from its
flag, else ``LORAPLEX_<FLAG>`` (e.g. ``LORAPLEX_MAX_LORAS=16``; ``LORAPLEX_ADAPTER=a=/x,b=/y`` for
several adapters; an empty value counts as unset), else the ``--config`` file (read by
``server/config_file.py``), else its default. ``build_configs`` then builds the frozen
``ModelConfig``, ``EngineConfig`` and ``ServerConfig`` of ``server/config.py``, which check the
ranges. Every failure is a ``ValueError`` with a one-line message, which ``server/cli.py`` prints
before exiting with status 2.

Torch-free, like ``server/cli.py``: ``loraplex --help`` and ``loraplex keys`` never import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.config import DEFAULT_MODEL, SUPPORTED_DTYPES, EngineConfig, ModelConfig, ServerConfig
from server.config_file import config_adapters, config_text, load_config_file

ENV_PREFIX = "LORAPLEX_"


@dataclass(frozen=True)
class Option:
    flag: str  # without the leading dashes
    type: Callable[[str], object]
    default: object
    help: str

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


SERVE_OPTIONS = (
    Option("model", str, DEFAULT_MODEL, "HF checkpoint directory, .gguf file or embedded model name"),
    Option(
        "host", str, ServerConfig.host, "address to bind (without --keys-file, keep it a loopback address)"
    ),
    Option("port", int, ServerConfig.port, "port to bind, 1 to 65535"),
    Option("served-model-name", str, None, "the base model's name in the API (default: --model)"),
    Option("max-loras", int, None, "device slots for adapters, i.e. distinct adapters per step"),
    Option("max-lora-rank", int, None, "largest adapter rank served (a step reads slots at its top rank)"),
    Option("max-num-seqs", int, None, "sequences in the running batch"),
    Option("max-model-len", int, None, "prompt + output tokens per request (default: the model's limit)"),
    Option("max-num-batched-tokens", int, None, "tokens in one forward pass"),
    Option(
        "dtype",
        str,
        None,
        f"one of {', '.join(SUPPORTED_DTYPES)} (default: CPU fp32 or bf16, measured; CUDA bf16)",
    ),
    Option("device", str, None, "cpu, cuda or cuda:N (default: cuda when available)"),
    Option(
        "data-dir",
        Path,
        None,
        "adapter store: metadata DB + uploads (default: $XDG_DATA_HOME/loraplex)",
    ),
    Option("keys-file", Path, None, "JSON file of API key hashes; without it: single-tenant, no auth"),
    Option(
        "adapter-roots",
        str,
        "",
        "comma-separated directories admins may register adapters from (a list in the config file)",
    ),
    Option(
        "max-cpu-adapters-bytes",
        int,
        None,
        "host-memory budget for adapter tensors, the copies of adapters in slots included",
    ),
    Option("merge-policy", str, None, "auto: serve hot adapters from merged copies by traffic; off"),
    Option("max-merged-copies", int, None, "merged copies at once"),
    Option("max-merged-bytes", int, None, "memory budget for merged copies (default: no limit)"),
    Option("merge-share", float, None, "share of scheduled tokens that makes an adapter hot"),
    Option("unmerge-share", float, None, "share below which a merged adapter goes cold"),
    Option(
        "max-queue",
        int,
        ServerConfig.max_queue,
        "requests that may wait beyond the running batch, >= 0; more get 429",
    ),
    Option(
        "drain-timeout",
        float,
        ServerConfig.drain_timeout,
        "seconds in-flight requests may finish after SIGTERM, >= 0",
    ),
    Option(
        "request-timeout",
        float,
        ServerConfig.request_timeout,
        "seconds for a request's headers in all and its body between chunks, > 0; then 408",
    ),
    Option(
        "max-connections",
        int,
        ServerConfig.max_connections,
        "open connections at once, >= 1; one more gets 503 and is closed",
    ),
    Option(
        "metrics-auth",
        str,
        ServerConfig.metrics_auth,
        "who may read /metrics: none (anyone) or admin (an admin API key; needs --keys-file)",
    ),
)
KEYS_FILE = next(option for option in SERVE_OPTIONS if option.flag == "keys-file")
LIST_OPTIONS = ("adapter-roots",)  # comma-separated as flag or env var; a list of strings in a config file
MODEL_FIELDS = ("model", "dtype", "device")
SERVER_FIELDS = (
    "host",
    "port",
    "max_queue",
    "drain_timeout",
    "metrics_auth",
    "request_timeout",
    "max_connections",
)
ENGINE_FIELDS = (
    "max_loras", "max_lora_rank", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
    "max_cpu_adapters_bytes", "merge_policy", "max_merged_copies", "max_merged_bytes", "merge_share",
    "unmerge_share",
)  # fmt: skip


def effective_default(option: Option) -> object:
    """An option's value when nothing sets it: its own default, else its config field's default."""
    if option.default is not None:
        return option.default
    for config in (ModelConfig, EngineConfig, ServerConfig):
        for field in dataclasses.fields(config):
            if field.name == option.dest and field.default is not dataclasses.MISSING:
                return field.default
    return None


def resolve_options(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, object]:
    """Each option from its flag, else its env var, else the --config file, else its default.

    Raises ValueError naming the flag, env var or file key for a value that does not convert.
    """
    known = [option.flag for option in SERVE_OPTIONS] + ["adapter"]
    config = load_config_file(getattr(args, "config", None) or environ.get("LORAPLEX_CONFIG"), known)
    values: dict[str, object] = {}
    for option in SERVE_OPTIONS:
        raw, source = getattr(args, option.dest), f"--{option.flag}"
        if raw is None and environ.get(option.env):
            raw, source = environ[option.env], option.env
        if raw is None and option.flag in config:
            value = config_text(option.flag, config[option.flag], is_list=option.flag in LIST_OPTIONS)
            raw, source = value, f"config key {option.flag}"
        try:
            values[option.dest] = option.default if raw is None else option.type(raw)
        except ValueError:
            raise ValueError(f"{source}: invalid {option.type.__name__} value {raw!r}") from None
    adapters = args.adapter or [a for a in environ.get("LORAPLEX_ADAPTER", "").split(",") if a.strip()]
    if not adapters and config.get("adapter") is not None:
        adapters = config_adapters(config["adapter"])
    values["adapters"] = parse_adapters(adapters)
    return values


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


def build_configs(options: dict[str, object]) -> tuple[ModelConfig, EngineConfig, ServerConfig]:
    """The frozen configs from resolved options (None: the field's default); ValueError out of range."""
    model_config = ModelConfig(**{name: options[name] for name in MODEL_FIELDS})
    engine_config = EngineConfig(
        **{name: options[name] for name in ENGINE_FIELDS if options[name] is not None}
    )
    server_config = ServerConfig(**{name: options[name] for name in SERVER_FIELDS})
    return model_config, engine_config, server_config


def keys_file_path(args: argparse.Namespace, environ: dict[str, str]) -> Path:
    """``--keys-file``, else ``LORAPLEX_KEYS_FILE``; ValueError if neither is given."""
    raw = args.keys_file or environ.get(KEYS_FILE.env)
    if not raw:
        raise ValueError(f"no keys file: pass --{KEYS_FILE.flag} PATH or set {KEYS_FILE.env}")
    return KEYS_FILE.type(raw)


def default_data_dir(environ: dict[str, str]) -> Path:
    """``--data-dir`` when nothing sets it: ``$XDG_DATA_HOME/loraplex``, else ``~/.local/share/loraplex``."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loraplex"


def parse_adapter_roots(text: str) -> list[Path]:
    """``"/a, ~/b"`` → [Path("/a"), Path.home() / "b"], resolved; spaces around a comma are not a path's."""
    return [Path(root.strip()).expanduser().resolve() for root in text.split(",") if root.strip()]
