"""Read and validate a LoRA adapter as peft saves it: adapter_config.json + adapter_model.safetensors.

Only safetensors is read (``torch.load`` is never called). The result maps each (layer, projection)
to its A [r, in] and B [out, r] tensors, keyed the way our model names its projections.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_REFUSED_CONFIG_FLAGS = ("use_dora", "modules_to_save", "auto_map", "layers_to_transform")


MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class AdapterFormatError(ValueError):
    """The adapter is not one we can serve; the message names the problem."""


def validate_name(name: object, what: str = "adapter name") -> str:
    """Return ``name`` if it is 1–64 chars of ``[A-Za-z0-9._-]`` not starting with a dot.

    Names (adapters and tenants) are only ever database keys, never joined into paths; the
    rule still excludes ``.``/``..``, slashes and control characters so a log line or a URL
    built from one is unambiguous.
    """
    if not isinstance(name, str) or not name:
        raise AdapterFormatError(f"{what} must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterFormatError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise AdapterFormatError(
            f"{what} {name!r} may only contain letters, digits, '.', '_' and '-', and may not start with '.'"
        )
    return name


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None

    @property
    def scale(self) -> float:
        """The factor folded into B: α/r, or α/√r for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class LoRAWeights:
    """A validated adapter in host memory."""

    config: LoRAConfig
    tensors: dict[
        tuple[int, str], tuple[torch.Tensor, torch.Tensor]
    ]  # (layer, proj) → (A [r, in], B [out, r])

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


def parse_config(raw: dict, max_lora_rank: int) -> LoRAConfig:
    """Validate a parsed adapter_config.json; raise AdapterFormatError naming the problem."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"peft_type must be LORA, got {raw.get('peft_type')!r}")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_lora_rank:
        raise AdapterFormatError(f"r must be an integer in [1, max_lora_rank={max_lora_rank}], got {rank!r}")
    alpha = raw.get("lora_alpha", rank)
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise AdapterFormatError(f"lora_alpha must be a finite positive number, got {alpha!r}")
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={raw.get('bias')!r} is not supported, only 'none'")
    for flag in _REFUSED_CONFIG_FLAGS:
        if raw.get(flag):
            raise AdapterFormatError(f"{flag} is not supported by loraplex")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise AdapterFormatError("per-module rank_pattern/alpha_pattern is not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return LoRAConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=tuple(sorted(str(t) for t in targets)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def parse_tensors(named: dict[str, torch.Tensor], config: LoRAConfig) -> dict[tuple[int, str], tuple]:
    """Pair lora_A/lora_B tensors per (layer, projection), checking keys, ranks, dtypes and values."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in named.items():
        match = _KEY.match(key)
        if not match or match.group(2) not in PROJECTIONS:
            raise AdapterFormatError(
                f"tensor {key!r} does not map to a supported projection ({', '.join(PROJECTIONS)})"
            )
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise AdapterFormatError(f"tensor {key!r} has dtype {tensor.dtype}; fp32/fp16/bf16 only")
        if tensor.ndim != 2:
            raise AdapterFormatError(f"tensor {key!r} must be 2-D, got shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"tensor {key!r} contains NaN or Inf")
        halves.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    if not halves:
        raise AdapterFormatError("the adapter has no LoRA tensors")
    pairs = {}
    for (layer, proj), half in halves.items():
        if set(half) != {"A", "B"}:
            raise AdapterFormatError(f"layer {layer} {proj}: lora_A and lora_B must both be present")
        lora_a, lora_b = half["A"], half["B"]
        if lora_a.shape[0] != config.rank or lora_b.shape[1] != config.rank:
            raise AdapterFormatError(
                f"layer {layer} {proj}: A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} "
                f"do not match r={config.rank}"
            )
        pairs[(layer, proj)] = (lora_a, lora_b)
    return pairs


def read_peft_dir(path: str | Path, max_lora_rank: int) -> LoRAWeights:
    """Read a peft adapter directory (safetensors only) into validated host tensors."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} not found in {path}")
    if not weights_path.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" ({', '.join(pickled)} refused: pickle files are never loaded)" if pickled else ""
        raise AdapterFormatError(f"{WEIGHTS_FILE} not found in {path}{hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    config = parse_config(raw, max_lora_rank)
    try:
        named = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several error types for malformed files
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    return LoRAWeights(config=config, tensors=parse_tensors(named, config))
