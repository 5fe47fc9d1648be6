"""Read and validate a LoRA adapter as peft saves it: adapter_config.json + adapter_model.safetensors.

Only safetensors is read: ``torch.load`` is never called and pickle files (``.bin``, ``.pt``) next to
the safetensors file are ignored. Our own limits (``FormatLimits``) on the file sizes, the header
length and the tensor count, and the whole safetensors byte layout, are checked before the
safetensors library sees the file (see ``adapters.safetensors_check``).

The config must describe plain LoRA: anything that changes the computation (DoRA, biases, per-module
ranks, layer selection, LoRA variants, …) or that would fetch or run code is refused. ``target_modules``
must be a list of module names (matched as peft does: the full module path, or a suffix after a dot)
or the shorthand ``"all-linear"``; a regex string is refused, since a hostile pattern could stall the
matcher. Targets and tensors must agree both ways. The result maps each (layer, projection) to its
A [r, in] and B [out, r] tensors, keyed the way our model names its projections.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import AdapterFormatError
from adapters.safetensors_check import SafetensorsFormatError, load_checked

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
PEFT_DEFAULT_ALPHA = 8  # what peft's LoraConfig uses when lora_alpha is absent
# peft 0.21 writes base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; ".default" (the
# adapter name) appears in raw state dicts. Layer indices have no leading zeros and at most 6 digits.
_KEY = re.compile(
    r"base_model\.model\.(?P<path>(?:model\.)?layers\.(?P<layer>0|[1-9]\d{0,5})\."
    r"(?:self_attn\.(?P<attn>[qkvo]_proj)|mlp\.(?P<mlp>gate_proj|up_proj|down_proj)))"
    r"\.lora_(?P<half>[AB])(?:\.default)?\.weight"
)
# peft LoraConfig fields (0.21) whose non-default value changes the math or needs code we do not run;
# auto_map is the transformers remote-code marker.
_REFUSED_FIELDS = (
    "use_dora", "use_qalora", "lora_bias", "fan_in_fan_out", "modules_to_save", "auto_map",
    "layers_to_transform", "layer_replication", "rank_pattern", "alpha_pattern", "target_parameters",
    "trainable_token_indices", "alora_invocation_tokens", "megatron_config", "use_bdlora",
    "arrow_config", "kasa_config", "monteclora_config", "velora_config",
)  # fmt: skip
# Fields we check ourselves, and fields that only matter for training, initialisation or bookkeeping
# (auto_mapping names the base model class for AutoPeftModel; we never import it).
_KNOWN_FIELDS = frozenset(_REFUSED_FIELDS) | {
    "peft_type", "r", "lora_alpha", "use_rslora", "bias", "target_modules", "exclude_modules",
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping",
    "lora_dropout", "init_lora_weights", "layers_pattern", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
}  # fmt: skip

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


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
class FormatLimits:
    """Upper bounds on what an adapter may make us read; all checked before any parsing."""

    max_weights_bytes: int = 2 * 1024**3
    max_header_bytes: int = 1024**2
    max_num_tensors: int = 4096
    max_config_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_weights_bytes", "max_header_bytes", "max_num_tensors", "max_config_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FormatLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = FormatLimits()


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None  # recorded, never fetched
    exclude_modules: tuple[str, ...] = ()

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


def content_key(weights_sha256: str, rank: int, alpha: float, use_rslora: bool) -> str:
    """hex sha256 naming what an adapter computes: its safetensors bytes (``weights_sha256``) and the
    config fields that scale them (its targets are the tensors present, which must agree with the
    config). Equal keys, equal adapters, whatever their names or versions (the prefix cache's key)."""
    content = {"weights": weights_sha256, "rank": rank, "alpha": alpha, "use_rslora": use_rslora}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_set(value: object) -> bool:
    """Whether a config value differs from peft's "off" defaults (None, False, empty)."""
    return value not in (None, False, "", [], {})


def _check_fields(raw: Mapping[str, object]) -> None:
    """Refuse config fields that change the math, need code, or are unknown to us."""
    if raw.get("peft_type") != "LORA":
        raise AdapterFormatError(f"peft_type must be LORA, got {raw.get('peft_type')!r}")
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={raw.get('bias')!r} is not supported, only 'none'")
    for field in _REFUSED_FIELDS:
        if _is_set(raw.get(field)):
            raise AdapterFormatError(
                f"{field}={_short(raw[field])} is not supported by loraplex (plain LoRA only)"
            )
    for field, value in raw.items():
        if field not in _KNOWN_FIELDS and _is_set(value):
            raise AdapterFormatError(
                f"unknown config field {field!r}={_short(value)}: cannot tell if it changes the adapter"
            )


def _check_rank_alpha(raw: Mapping[str, object], max_lora_rank: int) -> tuple[int, float]:
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_lora_rank:
        raise AdapterFormatError(f"r must be an integer in [1, max_lora_rank={max_lora_rank}], got {rank!r}")
    alpha = raw.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    # a number (bool is not one) in bounds: the comparison is exact for huge ints and False for NaN
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha <= sys.float_info.max:
        raise AdapterFormatError(f"lora_alpha must be a finite positive number, got {_short(alpha)}")
    return rank, float(alpha)


def _module_names(raw: Mapping[str, object], field: str, *, required: bool) -> tuple[str, ...]:
    """A list of module names (or ``"all-linear"`` for target_modules); regex strings are refused."""
    value = raw.get(field)
    if field == "target_modules" and value == ALL_LINEAR:
        return (ALL_LINEAR,)
    if isinstance(value, str):
        raise AdapterFormatError(
            f"{field} as a regex string ({value[:80]!r}) is not supported; list the module names instead"
        )
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise AdapterFormatError(f"{field} must be a non-empty list of module names, got {value!r}")
    return tuple(sorted(set(value)))


def parse_config(raw: Mapping[str, object], max_lora_rank: int) -> LoRAConfig:
    """Validate a parsed adapter_config.json; raise AdapterFormatError naming the problem."""
    _check_fields(raw)
    rank, alpha = _check_rank_alpha(raw, max_lora_rank)
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError(f"use_rslora must be true or false, got {use_rslora!r}")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFormatError(f"base_model_name_or_path must be a string, got {base!r}")
    return LoRAConfig(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=_module_names(raw, "target_modules", required=True),
        base_model_name_or_path=base,
        exclude_modules=_module_names(raw, "exclude_modules", required=False),
    )


def _suffixes(path: str) -> set[str]:
    """The names peft would match to ``path``: the path itself or any part after a dot."""
    parts = path.split(".")
    return {".".join(parts[i:]) for i in range(len(parts))}


def _check_targets(paths: set[str], config: LoRAConfig) -> None:
    """Every tensor's module is targeted and not excluded; every listed target has tensors."""
    targets, excluded, matched = set(config.target_modules), set(config.exclude_modules), set()
    for path in sorted(paths):
        names = _suffixes(path)
        if names & excluded:
            raise AdapterFormatError(f"module {path} has LoRA tensors but exclude_modules excludes it")
        if ALL_LINEAR not in targets and not names & targets:
            raise AdapterFormatError(
                f"module {path} has LoRA tensors but is not in target_modules {config.target_modules}"
            )
        matched |= names
    unmatched = sorted(targets - matched - {ALL_LINEAR})
    if unmatched:
        raise AdapterFormatError(f"target module {unmatched[0]!r} matches no tensor in {WEIGHTS_FILE}")


def _split_key(key: str) -> tuple[str, int, str, str]:
    """A tensor name → (module path, layer, projection, "A" or "B")."""
    match = _KEY.fullmatch(key)
    if not match:
        raise AdapterFormatError(
            f"tensor {key[:200]!r} does not map to a supported projection ({', '.join(PROJECTIONS)})"
        )
    return match["path"], int(match["layer"]), match["attn"] or match["mlp"], match["half"]


def _check_tensor(key: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterFormatError(f"tensor {key!r} has dtype {tensor.dtype}; fp32/fp16/bf16 only")
    if tensor.ndim != 2:
        raise AdapterFormatError(f"tensor {key!r} must be 2-D, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"tensor {key!r} contains NaN or Inf")


def _pair(
    layer: int, proj: str, half: dict[str, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one (layer, projection): A [r, in] and B [out, r] both present and consistent."""
    if set(half) != {"A", "B"}:
        raise AdapterFormatError(f"layer {layer} {proj}: lora_A and lora_B must both be present")
    lora_a, lora_b = half["A"], half["B"]
    if lora_a.shape[0] != rank:
        raise AdapterFormatError(
            f"layer {layer} {proj}: lora_A {tuple(lora_a.shape)} does not have r={rank} rows"
        )
    if lora_b.shape[1] != lora_a.shape[0]:
        raise AdapterFormatError(
            f"layer {layer} {proj}: lora_B {tuple(lora_b.shape)} inner dimension does not match "
            f"lora_A {tuple(lora_a.shape)}"
        )
    return lora_a, lora_b


def parse_tensors(
    named: dict[str, torch.Tensor], config: LoRAConfig
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Pair lora_A/lora_B per (layer, projection), checking keys, dtypes, values, ranks and targets."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    paths: set[str] = set()
    for key, tensor in named.items():
        path, layer, proj, half = _split_key(key)
        _check_tensor(key, tensor)
        slot = halves.setdefault((layer, proj), {})
        if half in slot:
            raise AdapterFormatError(f"layer {layer} {proj}: lora_{half} appears twice (as {key!r})")
        slot[half] = tensor
        paths.add(path)
    if not halves:
        raise AdapterFormatError("the adapter has no LoRA tensors")
    _check_targets(paths, config)
    return {key: _pair(*key, half, config.rank) for key, half in halves.items()}


def _read_config(path: Path, limits: FormatLimits) -> dict[str, object]:
    """adapter_config.json as a dict, its size checked before it is parsed."""
    with open(path, "rb") as file:
        data = file.read(limits.max_config_bytes + 1)
    if len(data) > limits.max_config_bytes:
        raise AdapterFormatError(f"{CONFIG_FILE} is over the limit of {limits.max_config_bytes} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _load_weights(path: Path, limits: FormatLimits) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, loaded only after our own header and layout checks passed."""
    try:
        named = load_checked(
            path,
            max_file_bytes=limits.max_weights_bytes,
            max_header_bytes=limits.max_header_bytes,
            max_num_tensors=limits.max_num_tensors,
        )
    except SafetensorsFormatError as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: {exc}") from None
    if not named:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no tensors: the adapter has no LoRA tensors")
    return named


def _weights_path(path: Path) -> Path:
    """The safetensors file; if only pickle files are there, say that they are refused."""
    weights_path = path / WEIGHTS_FILE
    if weights_path.is_file():
        return weights_path
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    hint = f"; {', '.join(pickled)} refused: pickle files are never loaded" if pickled else ""
    raise AdapterFormatError(f"{WEIGHTS_FILE} not found in {path}{hint}")


def read_peft_dir(path: str | Path, max_lora_rank: int, limits: FormatLimits = DEFAULT_LIMITS) -> LoRAWeights:
    """Read a peft adapter directory (safetensors only) into validated host tensors.

    Other files (README.md, training_args.bin, …) are ignored and never opened. Raises
    AdapterFormatError naming the first problem found.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} not found in {path}")
    weights_path = _weights_path(path)
    config = parse_config(_read_config(config_path, limits), max_lora_rank)
    named = _load_weights(weights_path, limits)
    return LoRAWeights(config=config, tensors=parse_tensors(named, config))


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tensor_name(layer: int, proj: str, half: str) -> str:
    """The name peft saves a Llama-family projection's ``lora_A`` / ``lora_B`` under."""
    block = "self_attn" if proj in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{half}.weight"


def write_peft_dir(weights: LoRAWeights, path: str | Path) -> None:
    """Save ``weights`` as peft saves a LoRA (``PeftModel.from_pretrained`` and ``read_peft_dir``
    load it back): adapter_config.json + adapter_model.safetensors, fp32 tensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = weights.config
    fields = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "use_rslora": config.use_rslora, "target_modules": sorted(config.target_modules),
        "exclude_modules": sorted(config.exclude_modules) or None, "bias": "none", "lora_dropout": 0.0,
        "base_model_name_or_path": config.base_model_name_or_path, "inference_mode": True,
    }  # fmt: skip
    tensors = {}
    for (layer, proj), (a, b) in weights.tensors.items():
        tensors[tensor_name(layer, proj, "A")] = a.float().contiguous()
        tensors[tensor_name(layer, proj, "B")] = b.float().contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(fields, indent=2))
