"""Every engine setting, as frozen dataclasses validated once at start.

Each dataclass raises ``ValueError`` with a message that names the setting and the allowed range,
so a bad flag, env var or config-file key fails at start with a clear message, never mid-request.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
METRICS_AUTH = ("none", "admin")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")  # what torch.device accepts for the two we serve on


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how.

    ``model`` is a local HF checkpoint directory, a ``.gguf`` file, or the name of the embedded
    default (``smollm2-135m-instruct``). ``cache_dir`` holds converted checkpoints (None: the
    ``LORAPLEX_CACHE_DIR`` env var, else ``~/.cache/loraplex``).
    """

    model: str = DEFAULT_MODEL
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda when available, else cpu
    cache_dir: str | None = None

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


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuously batched engine.

    - ``max_loras``: device slots, so at most this many distinct adapters run in one step.
    - ``max_lora_rank``: slot buffers have room for this rank; adapters above it are refused.
      A step reads the slots only up to the largest rank among its adapters.
    - ``max_num_seqs``: sequences in the running batch.
    - ``max_num_batched_tokens``: tokens in one forward (prefill chunks + decode tokens).
    - ``max_model_len``: prompt + generated tokens per sequence (None: the model's limit).
    - ``kv_cache_bytes``: KV-cache budget (None: enough for ``max_num_seqs`` full-length
      sequences, capped at 512 MiB on CPU). ``kv_block_size``: tokens per paged block.
    - ``target_modules``: projections that get a LoRA side path (adapters may use a subset).
    - ``max_cpu_adapters_bytes``: host-memory tier: bytes of adapter tensors in host memory, the
      copies of adapters in slots included; least recently used copies beyond it that are in no
      slot and not pinned are dropped and read from disk again when needed.
    - ``merge_policy``: ``auto`` serves hot adapters from merged copies (W + s·B·A) chosen by
      traffic, ``off`` only when an operator asks. ``max_merged_copies`` / ``max_merged_bytes``
      bound them; an adapter is merged when its share of scheduled tokens stays ≥ ``merge_share``
      and unmerged when it stays < ``unmerge_share`` (see server/engine/merging.py).
    """

    max_loras: int = 8
    max_lora_rank: int = 64
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    kv_block_size: int = 16
    target_modules: tuple[str, ...] = field(default=ALL_TARGET_MODULES)
    seed: int = 0
    max_cpu_adapters_bytes: int = 2 * 1024**3
    merge_policy: str = "auto"
    max_merged_copies: int = 1
    max_merged_bytes: int | None = None
    merge_share: float = 0.9  # measured: a step split into a merged and a side-path forward costs
    unmerge_share: float = 0.6  # a second read of every base weight (docs/benchmarks.md)

    def __post_init__(self) -> None:
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
            self.kv_block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            f"kv_block_size must be a power of two in [1, 128], got {self.kv_block_size}",
        )
        unknown = sorted(set(self.target_modules) - set(ALL_TARGET_MODULES))
        _require(not unknown, f"unknown target modules {unknown}; supported: {', '.join(ALL_TARGET_MODULES)}")
        _require(bool(self.target_modules), "target_modules must name at least one projection")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side of ``loraplex serve``.

    - ``host``, ``port``: the address uvicorn binds; port 0 (an OS-chosen port nobody could be
      told about) is refused.
    - ``max_queue``: requests that may wait beyond the running batch; more get 429. 0: none wait.
    - ``drain_timeout``: seconds in-flight requests may run after SIGTERM (0: end them at once).
    - ``request_timeout``: seconds a request's headers may take to arrive in all, and its body
      between two chunks; then 408 (``server.api.connections``).
    - ``max_connections``: open connections at once; one more gets a 503 and is closed.
    - ``metrics_auth``: who may read ``GET /metrics``: ``none`` (anyone who reaches the port, as
      in vLLM) or ``admin`` (an admin API key; needs a keys file). ``vllm:lora_requests_info``
      names the adapters running, so a server shared by tenants should not leave it open.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 256
    drain_timeout: float = 30.0
    metrics_auth: str = "none"
    request_timeout: float = 30.0
    max_connections: int = 1024

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
