"""Every setting, as frozen dataclasses validated once at start, each declared once, on its field.

Each field is a ``setting(default, meaning, range=...)``: its default, what it means (the Markdown
of docs/operations.md's Configuration table) and the range ``__post_init__`` accepts, as text.
``server/settings.py`` derives everything else from the declarations: the ``loraplex serve`` flag
(the field name with dashes), its ``--help``, the ``LORAPLEX_*`` env var, the config-file key, the
docs tables (``python -m server.settings --markdown``) and the config echo of ``GET /v1/stats``.

Each dataclass raises ``ValueError`` with a message that names the setting and the allowed range,
so a bad flag, env var or config-file key fails at start with a clear message, never mid-request.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
METRICS_AUTH = ("none", "admin")
QUANTIZATION_SCHEMES = ("auto", "none", "int4", "int8", "nf4")  # server/model/quant/
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")  # what torch.device accepts for the two we serve on
SETTING = "loraplex.setting"  # the dataclass field metadata key of a field's declaration


@dataclass(frozen=True)
class Setting:
    """How one config field is documented and set; its name, type and default are the field's.

    - ``meaning``: Markdown, the docs table's cell. ``--help`` is its first clause (up to the first
      ``;`` or full stop outside parentheses), plus the clause starting ``none:`` when the default
      is None, so keep the first clause a summary that stands alone.
    - ``range``: the docs' range cell (Markdown), ``—`` for a value not checked at start; it must
      say exactly what ``__post_init__`` accepts (tests/test_docs_operations.py probes the bounds).
    - ``has_flag``: False for a setting only Python callers set (it has no flag, env var or key).
    - ``is_list``: comma-separated as a flag or env var; a list of strings in the config file too.
    """

    meaning: str
    range: str = "—"
    has_flag: bool = True
    is_list: bool = False


def setting(default: object, meaning: str, *, range: str = "—", has_flag: bool = True,
            is_list: bool = False) -> Any:  # fmt: skip
    """A dataclass field with ``default`` whose metadata holds its ``Setting`` (see above)."""
    return field(default=default, metadata={SETTING: Setting(meaning, range, has_flag, is_list)})


def _ticked(values: tuple[str, ...]) -> str:
    return ", ".join(f"`{value}`" for value in values)


def default_cache_dir() -> Path:
    """``ModelConfig.cache_dir`` when unset: ``$LORAPLEX_CACHE_DIR`` when set and non-empty, else
    ``~/.cache/loraplex`` (converted checkpoints, CPU kernel choices, built C kernels)."""
    env = os.environ.get("LORAPLEX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraplex"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how (each field's declaration says what it means)."""

    model: str = setting(
        DEFAULT_MODEL,
        "an HF checkpoint directory (`config.json`, safetensors weights, tokenizer), a `.gguf` file "
        "(converted once into `LORAPLEX_CACHE_DIR`) or the embedded model's name; nothing is ever downloaded",
        range="non-empty",
    )
    dtype: str | None = setting(
        None,
        "serving dtype of the weights, LoRA slots, merged copies and KV cache; none: on CPU, `float32` or "
        "`bfloat16`, whichever the start-up measurement finds faster (see [CPU kernel choices]"
        "(#cpu-kernel-choices)), `bfloat16` on CUDA",
        range=_ticked(SUPPORTED_DTYPES),
    )
    device: str | None = setting(
        None,
        "the torch device to serve on; none: `cuda` when torch sees a GPU, else `cpu`",
        range="`cpu`, `cuda`, `cuda:N`",
    )
    quantization: str = setting(
        "auto",
        "weights of the base model's linear layers (adapters always stay in full precision): `auto` "
        "serves a `.gguf` base's Q4_0/Q4_1/Q4_K weights on their own blocks (as `int4`; its other weights "
        "dense) when no `--dtype` is given and the start-up measurement finds that faster than dense, "
        "and any other base as stored; "
        "`none` dequantizes to the serving dtype; `int4` (groups of 32 inputs, scale and minimum) or "
        "`int8` (per output channel) quantize at load, on CPU; `nf4` quantizes at load with bitsandbytes "
        "(the `quant` extra) exactly as transformers' 4-bit loading does, so QLoRA adapters see the base "
        "they were trained on. No merged copies are made over a quantized base",
        range=_ticked(QUANTIZATION_SCHEMES),
    )
    cache_dir: str | None = setting(
        None,
        "`ModelConfig`: where converted `.gguf` and embedded checkpoints go; none: `$LORAPLEX_CACHE_DIR`, "
        "else `~/.cache/loraplex`",
        has_flag=False,
    )

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must name a checkpoint directory, a .gguf file or the default")
        _require(
            self.dtype is None or self.dtype in SUPPORTED_DTYPES,
            f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}",
        )
        _require(
            self.device is None or DEVICE_PATTERN.fullmatch(self.device) is not None,
            f"device must be cpu, cuda or cuda:N, got {self.device!r}",
        )
        _require(
            self.quantization in QUANTIZATION_SCHEMES,
            f"quantization must be one of {', '.join(QUANTIZATION_SCHEMES)}, got {self.quantization!r}",
        )


KV_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuously batched engine (each field's declaration says what it means).

    The merge policy's other constants (window, steps, requests) are in server/engine/merging.py.
    """

    max_loras: int = setting(
        8,
        "device slots: at most this many distinct adapters in one step on the LoRA side path (requests on "
        "a merged copy need none); at most `max-loras − 1` adapters can be pinned. All slots are "
        "allocated at start: see [Sizing](#sizing)",
        range="`[1, 256]`",
    )
    max_lora_rank: int = setting(
        64,
        "largest adapter rank accepted (higher ones are refused at upload); every slot has room for it "
        "(memory), and a step reads the slots only up to the largest rank among its adapters",
        range="`[1, 512]`",
    )
    max_num_seqs: int = setting(
        32,
        "sequences in the running batch; also sizes the default KV cache and the 429 limit "
        "(`max-num-seqs + max-queue` requests in flight)",
        range="`[1, 1024]`",
    )
    scheduling: str = setting(
        "fair",
        "order in which waiting requests are admitted: `fair` shares the engine between tenants by "
        "their tokens served (a Virtual Token Counter, weighted by each tenant's `--weight`; a tenant "
        "alone gets the whole server), `fcfs` by arrival. Either way a request's `priority` orders "
        "only its own tenant's requests (see [Fair scheduling](#fair-scheduling-and-tenant-limits))",
        range="`fair`, `fcfs`",
    )
    max_num_batched_tokens: int = setting(
        2048,
        "tokens in one forward: one per decoding sequence plus prefill chunks (longer prompts are "
        "prefilled in several steps)",
        range="`>= max-num-seqs`",
    )
    max_model_len: int | None = setting(
        None,
        "prompt + output tokens per request; none: the model's `max_position_embeddings` (its sliding "
        "window, if smaller). More than that is refused when the model loads",
        range="`>= 2`",
    )
    max_logprobs: int = setting(
        20,
        "most alternatives per token a request may ask for: completions' `logprobs` (also the prompt "
        "tokens' with `echo`) and chat's `top_logprobs`; a request over it is a 400 naming the field "
        "(vLLM's default, and OpenAI's chat limit)",
        range="`>= 0`",
    )
    kv_cache_bytes: int | None = setting(
        None,
        "KV-cache budget; none: room for `max-num-seqs` sequences of `max-model-len` tokens, capped at "
        "512 MiB on CPU and not capped on CUDA (see [Sizing](#sizing))",
        range="`> 0`",
        has_flag=False,
    )
    kv_block_size: int = setting(
        16, "tokens per KV-cache block", range=_ticked(tuple(map(str, KV_BLOCK_SIZES))), has_flag=False
    )
    target_modules: tuple[str, ...] = setting(
        ALL_TARGET_MODULES,
        "the projections that get LoRA slots; adapters may target any subset of them",
        range="non-empty subset",
        has_flag=False,
    )
    seed: int = setting(
        0,
        "seed of the sampler's shared generator (requests that give a `seed` draw from their own)",
        has_flag=False,
    )
    max_cpu_adapters_bytes: int = setting(
        2 * 1024**3,
        "host-memory tier: bytes of adapter tensors kept in host memory, the adapters in slots included; "
        "least recently used copies beyond it are dropped and read from disk again when needed, but "
        "pinned and slot-resident ones stay even over it",
        range="`>= 0`",
    )
    merge_policy: str = setting(
        "auto",
        "`auto`: adapters that carry most of the traffic are served from merged copies, `off`: only when "
        "an admin asks (`POST /v1/adapters/{name}/merge`)",
        range="`auto`, `off`",
    )
    max_merged_copies: int = setting(
        1,
        "merged copies at once, admin merges included; `0` turns merging off, admin merges too",
        range="`[0, 64]`",
    )
    max_merged_bytes: int | None = setting(
        None,
        "memory for the merged copies the policy builds (admin merges are kept even over it); none: no "
        "limit. A copy's size is known before it is built (see [Sizing](#sizing)); one that would not "
        "fit beside the copies held and being built is not built",
        range="`>= 0`",
    )
    # measured: a step split into a merged and a side-path forward costs a second read of every base
    # weight (docs/benchmarks.md), hence shares this high
    merge_share: float = setting(
        0.9,
        "an adapter whose share of the tokens scheduled over the last 64 steps stays at or above this for "
        "16 steps, with at least 2 requests running or waiting, gets a merged copy",
        range="`(unmerge-share, 1]`",
    )
    unmerge_share: float = setting(
        0.6,
        "a merged adapter whose share stays below this for 64 steps is unmerged; its running requests "
        "finish on the copy",
        range="`(0, merge-share)`",
    )

    prefix_caching: str = setting(
        "on",
        "`on`: a request's prefill starts after the longest prefix of full KV blocks already computed for "
        "the same tokens by the same weights (the adapter's content, not its name) for the same tenant and "
        "`cache_salt`; idle cached blocks are evicted least recently used first when memory is needed. "
        "`off`: every prompt is computed in full",
        range="`on`, `off`",
    )
    prefix_cache_sharing: str = setting(
        "tenant",
        "whose cached blocks a request may reuse: `tenant`, only those computed for its own tenant (a "
        "shared cache is a timing side channel), or `base`, the base model's blocks across tenants too "
        "(adapters' stay per tenant)",
        range="`tenant`, `base`",
    )

    def __post_init__(self) -> None:
        _require(
            self.scheduling in ("fair", "fcfs"), f"scheduling must be fair or fcfs, got {self.scheduling!r}"
        )
        _require(
            self.prefix_caching in ("on", "off"),
            f"prefix_caching must be on or off, got {self.prefix_caching!r}",
        )
        _require(
            self.prefix_cache_sharing in ("tenant", "base"),
            f"prefix_cache_sharing must be tenant or base, got {self.prefix_cache_sharing!r}",
        )
        _require(
            self.merge_policy in ("auto", "off"),
            f"merge_policy must be auto or off, got {self.merge_policy!r}",
        )
        _require(
            0 <= self.max_merged_copies <= 64,
            f"max_merged_copies must be in [0, 64], got {self.max_merged_copies}",
        )
        _require(
            0 < self.unmerge_share < self.merge_share <= 1,
            f"need 0 < unmerge_share ({self.unmerge_share}) < merge_share ({self.merge_share}) <= 1",
        )
        _require(
            self.max_merged_bytes is None or self.max_merged_bytes >= 0,
            f"max_merged_bytes must be >= 0, got {self.max_merged_bytes}",
        )
        _require(self.max_logprobs >= 0, f"max_logprobs must be >= 0, got {self.max_logprobs}")
        _require(
            self.max_cpu_adapters_bytes >= 0,
            f"max_cpu_adapters_bytes must be >= 0, got {self.max_cpu_adapters_bytes}",
        )
        _require(1 <= self.max_loras <= 256, f"max_loras must be in [1, 256], got {self.max_loras}")
        _require(
            1 <= self.max_lora_rank <= 512, f"max_lora_rank must be in [1, 512], got {self.max_lora_rank}"
        )
        _require(
            1 <= self.max_num_seqs <= 1024, f"max_num_seqs must be in [1, 1024], got {self.max_num_seqs}"
        )
        _require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
            f"({self.max_num_seqs}) so every running sequence can decode in one step",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 2,
            f"max_model_len must be >= 2, got {self.max_model_len}",
        )
        _require(
            self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
            f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}",
        )
        _require(
            self.kv_block_size in KV_BLOCK_SIZES,
            f"kv_block_size must be a power of two in [1, 128], got {self.kv_block_size}",
        )
        unknown = sorted(set(self.target_modules) - set(ALL_TARGET_MODULES))
        _require(not unknown, f"unknown target modules {unknown}; supported: {', '.join(ALL_TARGET_MODULES)}")
        _require(bool(self.target_modules), "target_modules must name at least one projection")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side of ``loraplex serve`` (each field's declaration says what it means)."""

    host: str = setting(
        "127.0.0.1",
        "address to bind (without `--keys-file`, keep it a loopback address; the image passes `0.0.0.0`)",
    )
    port: int = setting(
        8000,
        "port to bind; `0` (a port the OS picks, which the log, probes and clients could not know) is "
        "refused; a port in use fails when binding, after the model has loaded",
        range="`[1, 65535]`",
    )
    max_queue: int = setting(
        256,
        "requests that may wait beyond the running batch: a request that would put more than "
        "`max-num-seqs + max-queue` in flight gets 429 (`Retry-After: 1`); a request counts from the "
        "moment it is admitted, before its prompt is tokenized, so a burst cannot overrun the limit; "
        "`0`: none wait",
        range="`>= 0`",
    )
    drain_timeout: float = setting(
        30.0,
        "seconds in-flight requests may run after SIGTERM before they end with an error (finite; `0`: at "
        "once)",
        range="`>= 0`",
    )
    metrics_auth: str = setting(
        "none",
        "who may read `/metrics`: `none`, anyone who reaches the port (as in vLLM), or `admin`, callers "
        "with an admin API key (needs `--keys-file`; give Prometheus the key, see [Metrics](#metrics)). "
        "`vllm:lora_requests_info` names the adapters running, so a server shared by tenants should use "
        "`admin` or keep the port private",
        range=_ticked(METRICS_AUTH),
    )
    request_timeout: float = setting(
        30.0,
        "seconds a request's headers may take in all (from the first byte, so a trickle cannot stretch "
        "it) and its body between two chunks, then a 408 `request_timeout` and the connection is closed. "
        "Other clients are served meanwhile",
        range="`> 0`",
    )
    max_connections: int = setting(
        1024,
        "open HTTP connections at once: one more gets a 503 `too_many_connections` (`Retry-After: 1`) and "
        "is closed before it costs a request",
        range="`>= 1`",
    )

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, f"port must be in [1, 65535], got {self.port}")
        _require(self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}")
        _require(
            self.metrics_auth in METRICS_AUTH,
            f"metrics_auth must be none or admin, got {self.metrics_auth!r}",
        )
        _require(
            math.isfinite(self.drain_timeout) and self.drain_timeout >= 0,
            f"drain_timeout must be a finite number of seconds >= 0, got {self.drain_timeout}",
        )
        _require(
            math.isfinite(self.request_timeout) and self.request_timeout > 0,
            f"request_timeout must be a finite number of seconds > 0, got {self.request_timeout}",
        )
        _require(self.max_connections >= 1, f"max_connections must be >= 1, got {self.max_connections}")


@dataclass(frozen=True)
class ProcessConfig:
    """The rest of ``loraplex serve``: the base model's API name, the adapter store, the keys file.

    Declared here with the others; nothing in it is range-checked, and ``server/cli.py`` reads the
    values from ``server.settings.resolve_options``' dict rather than from an instance.
    """

    served_model_name: str | None = setting(
        None, "the base model's `model` name in the API; none: the `--model` value. No `--adapter` may use it"
    )
    data_dir: Path | None = setting(
        None,
        "the adapter store (SQLite database + adapter files), one process per directory; none: "
        "`$XDG_DATA_HOME/loraplex`, else `~/.local/share/loraplex` (the image sets `/data`)",
    )
    adapter_store: str | None = setting(
        None,
        "a `postgresql://user[:password]@host[:port]/db` URL: keep adapter metadata in PostgreSQL, shared by "
        "every replica given the same URL (needs `--adapter-blobs`; the `shared` extra); none: SQLite in "
        "`--data-dir`, one process",
    )
    adapter_blobs: str | None = setting(
        None,
        "an `s3://bucket[/prefix]` URL for the adapter files of a shared `--adapter-store` (endpoint and "
        "credentials from the usual AWS environment, e.g. `AWS_ENDPOINT_URL`); `--data-dir` then holds "
        "each replica's local copies",
    )
    keys_file: Path | None = setting(
        None,
        "JSON file of API key hashes (`loraplex keys add`), re-read when it changes; none: one tenant, no "
        "authentication",
    )
    adapter_roots: str = setting(
        "",
        "comma-separated directories that admins may register adapters from in place "
        "(`POST /v1/load_lora_adapter`); in the config file also a list of strings. The parent directory "
        "of every `--adapter` path is added",
        is_list=True,
    )
