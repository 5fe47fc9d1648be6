"""A catalogue of broken and hostile peft adapter directories, for any test that reads adapters.

Each ``HostileCase.build(dir)`` writes one adapter into the empty directory ``dir``; reading it with
``read_peft_dir(dir, MAX_LORA_RANK)`` must raise ``AdapterFormatError`` whose message contains
``reason``. Most cases start from a real adapter saved by peft (``clean_adapter``) and change one
thing: a config field, a tensor, the safetensors header or raw bytes.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_LORA_RANK = 16  # the rank cap the reasons below assume
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
Q0_A, Q0_B = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
V1_B = f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"
_DROP = object()


@dataclass(frozen=True)
class HostileCase:
    id: str
    build: Callable[[Path], None]
    reason: str  # a substring of the AdapterFormatError message


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="loraplex-hostile-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tiny_base_model() -> Path:
    """A tiny random Llama checkpoint (2 layers, hidden 64), built once per process."""
    from tests.engine.tiny import write_tiny_llama

    return write_tiny_llama(_root() / "base", seed=0)


@functools.cache
def _saved_adapter(frozen_kwargs: tuple) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen_kwargs}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model())
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
    out = Path(tempfile.mkdtemp(prefix="adapter-", dir=_root()))
    peft_model.save_pretrained(out)
    return out


def clean_adapter(directory: Path, **lora_kwargs) -> Path:
    """Copy a real peft adapter into ``directory``: r=4, α=8, q_proj+v_proj unless overridden.

    ``lora_kwargs`` go to peft's ``LoraConfig``; each distinct set is trained-free and saved once.
    """
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) | lora_kwargs
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items()))
    shutil.copytree(_saved_adapter(frozen), directory, dirs_exist_ok=True)
    return directory


def _pack(header: bytes, data: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def config_case(case_id: str, reason: str, **changes) -> HostileCase:
    """The clean adapter with config fields set (``_DROP`` removes one)."""

    def build(directory: Path) -> None:
        config = json.loads((clean_adapter(directory) / CONFIG).read_text())
        for key, value in changes.items():
            config.pop(key) if value is _DROP else config.__setitem__(key, value)
        (directory / CONFIG).write_text(json.dumps(config))

    return HostileCase(case_id, build, reason)


def config_text_case(case_id: str, reason: str, text: bytes) -> HostileCase:
    def build(directory: Path) -> None:
        (clean_adapter(directory) / CONFIG).write_bytes(text)

    return HostileCase(case_id, build, reason)


def tensors_case(case_id: str, reason: str, edit: Callable[[dict], None]) -> HostileCase:
    """The clean adapter re-saved (a valid safetensors file) after ``edit`` changed its tensors."""

    def build(directory: Path) -> None:
        named = load_file(clean_adapter(directory) / WEIGHTS)
        edit(named)
        save_file({k: v.contiguous() for k, v in named.items()}, directory / WEIGHTS, {"format": "pt"})

    return HostileCase(case_id, build, reason)


def header_case(case_id: str, reason: str, edit: Callable[[dict], object]) -> HostileCase:
    """The clean file with its JSON header changed by ``edit`` (which may return a replacement)."""

    def build(directory: Path) -> None:
        path = clean_adapter(directory) / WEIGHTS
        header, data = _split(path.read_bytes())
        replaced = edit(header)
        header = header if replaced is None else replaced
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        path.write_bytes(_pack(text, data))

    return HostileCase(case_id, build, reason)


def bytes_case(case_id: str, reason: str, edit: Callable[[bytes], bytes]) -> HostileCase:
    def build(directory: Path) -> None:
        path = clean_adapter(directory) / WEIGHTS
        path.write_bytes(edit(path.read_bytes()))

    return HostileCase(case_id, build, reason)


def _pickle_only(name: str) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        path = clean_adapter(directory) / WEIGHTS
        torch.save(load_file(path), directory / name)  # a real pickle, as old trainers wrote it
        path.unlink()

    return build


def _remove(name: str) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        (clean_adapter(directory) / name).unlink()

    return build


def _sparse_huge(directory: Path) -> None:
    with open(clean_adapter(directory) / WEIGHTS, "r+b") as file:
        file.truncate(2 * 1024**3 + 1)  # sparse: takes no disk space


def _huge_metadata(directory: Path) -> None:
    """A valid safetensors file (the library accepts it) whose header is over our 1 MiB limit."""
    named = load_file(clean_adapter(directory) / WEIGHTS)
    save_file(named, directory / WEIGHTS, {"format": "pt", "pad": "x" * (1024**2 + 100)})


def _many_tensors(directory: Path) -> None:
    clean_adapter(directory)
    save_file({f"t{i}": torch.zeros(1) for i in range(4097)}, directory / WEIGHTS)


def _empty_weights(directory: Path) -> None:
    clean_adapter(directory)
    save_file({}, directory / WEIGHTS, {"format": "pt"})


def _set_length(length: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    return lambda raw: struct.pack("<Q", length(raw)) + raw[8:]


def _cut_in_data(raw: bytes) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + length + (len(raw) - 8 - length) // 2]


def _ordered(header: dict) -> list[dict]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])


def _overlap(header: dict) -> None:
    first, second = _ordered(header)[:2]
    second["data_offsets"] = list(first["data_offsets"])


def _beyond(header: dict) -> None:
    last = _ordered(header)[-1]
    last["data_offsets"] = [o + 1024 for o in last["data_offsets"]]


def _duplicate_key(header: dict) -> bytes:
    text = json.dumps(header)
    return (text[:-1] + f", {json.dumps(Q0_A)}: {json.dumps(header[Q0_A])}}}").encode()


def _entry(key: str, field: str, value: object) -> Callable[[dict], None]:
    return lambda header: header[key].__setitem__(field, value)


def _retype(dtype: torch.dtype) -> Callable[[dict], None]:
    def edit(named: dict) -> None:
        named[Q0_A] = named[Q0_A].to(dtype)

    return edit


def _poison(value: float) -> Callable[[dict], None]:
    def edit(named: dict) -> None:
        named[V1_B] = named[V1_B].clone()
        named[V1_B][3, 1] = value

    return edit


def _bf16_nan(named: dict) -> None:
    named[Q0_A] = named[Q0_A].to(torch.bfloat16)
    named[Q0_A][0, 0] = math.nan


def _add(extra: dict[str, tuple[int, ...]]) -> Callable[[dict], None]:
    def edit(named: dict) -> None:
        named.update({key: torch.randn(shape) for key, shape in extra.items()})

    return edit


def _rename(old: str, new: str) -> Callable[[dict], None]:
    def edit(named: dict) -> None:
        for key in [k for k in named if old in k]:
            named[key.replace(old, new)] = named.pop(key)

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    def edit(named: dict) -> None:
        del named[key]

    return edit


def _reshape(**shapes: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    keys = {"a": Q0_A, "b": Q0_B}

    def edit(named: dict) -> None:
        for name, change in shapes.items():
            named[keys[name]] = change(named[keys[name]])

    return edit


_REFUSED = dict(
    use_dora=True, use_qalora=True, lora_bias=True, fan_in_fan_out=True, modules_to_save=["lm_head"],
    auto_map={"AutoModel": "evil.modeling.Model"}, layers_to_transform=[0], layer_replication=[[0, 1]],
    rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 16}, target_parameters=["mlp.experts.down_proj"],
    trainable_token_indices=[1, 2], alora_invocation_tokens=[1, 2], megatron_config={"tp": 2},
    use_bdlora={"split": "A"}, arrow_config={"top_k": 2}, velora_config={"rank": 1},
)  # fmt: skip
_NOT_RANK = "r must be an integer in [1, max_lora_rank=16]"
_NOT_ALPHA = "lora_alpha must be a finite positive number"
_NO_PROJECTION = "does not map to a supported projection"
_TARGETS = "target_modules must be a non-empty list of module names"
_K0 = f"{PREFIX}.0.self_attn.k_proj"
_EMBED = "base_model.model.model.embed_tokens.lora_embedding_A"

CASES: list[HostileCase] = [
    HostileCase("pickle-bin-only", _pickle_only("adapter_model.bin"), "adapter_model.bin refused"),
    HostileCase("pickle-pt-only", _pickle_only("adapter_model.pt"), "adapter_model.pt refused"),
    HostileCase("missing-config", _remove(CONFIG), "adapter_config.json not found"),
    HostileCase("missing-weights", _remove(WEIGHTS), "adapter_model.safetensors not found"),
    config_text_case("config-not-json", "adapter_config.json is not valid JSON", b'{"r": 4,'),
    config_text_case("config-not-utf8", "adapter_config.json is not valid JSON", b'{"r": "\xff"}'),
    config_text_case("config-deep-nesting", "adapter_config.json is not valid JSON", b"[" * 60_000),
    config_text_case("config-not-object", "adapter_config.json must hold a JSON object", b"[1, 2]"),
    config_text_case("config-too-large", "over the limit of 65536 bytes", b"{}" + b" " * 70_000),
    config_case("peft-type-ia3", "peft_type must be LORA", peft_type="IA3"),
    config_case("peft-type-missing", "peft_type must be LORA", peft_type=_DROP),
    config_case("r-too-large", _NOT_RANK, r=32),
    config_case("r-zero", _NOT_RANK, r=0),
    config_case("r-negative", _NOT_RANK, r=-4),
    config_case("r-float", _NOT_RANK, r=4.0),
    config_case("r-string", _NOT_RANK, r="4"),
    config_case("r-bool", _NOT_RANK, r=True),
    config_case("r-missing", _NOT_RANK, r=_DROP),
    config_case("alpha-nan", _NOT_ALPHA, lora_alpha=math.nan),
    config_case("alpha-inf", _NOT_ALPHA, lora_alpha=math.inf),
    config_case("alpha-negative", _NOT_ALPHA, lora_alpha=-8),
    config_case("alpha-zero", _NOT_ALPHA, lora_alpha=0),
    config_case("alpha-huge-int", _NOT_ALPHA, lora_alpha=10**400),
    config_case("alpha-string", _NOT_ALPHA, lora_alpha="8"),
    config_case("alpha-null", _NOT_ALPHA, lora_alpha=None),
    config_case("alpha-bool", _NOT_ALPHA, lora_alpha=True),
    config_case("use-rslora-string", "use_rslora must be true or false", use_rslora="yes"),
    config_case("bias-all", "bias='all' is not supported", bias="all"),
    config_case("bias-lora-only", "bias='lora_only' is not supported", bias="lora_only"),
    *(config_case(field.replace("_", "-"), f"{field}=", **{field: v}) for field, v in _REFUSED.items()),
    config_case("unknown-field", "unknown config field 'trust_remote_code'", trust_remote_code=True),
    config_case("target-modules-regex", "target_modules as a regex string", target_modules=r".*\.q_proj"),
    config_case("target-modules-missing", _TARGETS, target_modules=_DROP),
    config_case("target-modules-empty", _TARGETS, target_modules=[]),
    config_case("target-modules-not-strings", _TARGETS, target_modules=[1, 2]),
    config_case("exclude-modules-regex", "exclude_modules as a regex string", exclude_modules="q.*"),
    config_case(
        "base-model-not-string", "base_model_name_or_path must be a string", base_model_name_or_path=5
    ),
    HostileCase("weights-too-large", _sparse_huge, "file is 2147483649 bytes, over the limit of 2147483648"),
    bytes_case("weights-too-short", "too short for a safetensors header", lambda raw: raw[:5]),
    bytes_case("weights-empty-file", "too short for a safetensors header", lambda raw: b""),
    bytes_case("weights-truncated", "the file is truncated", _cut_in_data),
    bytes_case("header-length-past-file", "runs past the end of the file", _set_length(len)),
    bytes_case(
        "header-length-over-limit", "over the limit of 1048576 bytes", _set_length(lambda r: 2**64 - 1)
    ),
    HostileCase("header-over-limit", _huge_metadata, "over the limit of 1048576 bytes"),
    header_case("header-not-json", "header is not valid JSON", lambda h: b'{"a": [1, 2'),
    header_case("header-not-utf8", "header is not valid JSON", lambda h: b'{"\xff\xfe": 1}'),
    header_case("header-not-object", "header must be a JSON object", lambda h: b"[]"),
    header_case(
        "header-nan", "NaN is not a number", lambda h: json.dumps(h).replace("64", "NaN", 1).encode()
    ),
    header_case("header-duplicate-key", "duplicate key", _duplicate_key),
    header_case(
        "metadata-not-strings", "__metadata__ must map strings to strings", _entry("__metadata__", "n", 1)
    ),
    header_case("entry-extra-field", "entry must have exactly", _entry(Q0_A, "offset", 0)),
    header_case("entry-not-object", "entry must have exactly", lambda h: h.__setitem__(Q0_A, [1])),
    HostileCase("too-many-tensors", _many_tensors, "4097 tensors, over the limit of 4096"),
    header_case("offsets-overlap", "overlap in the data section", _overlap),
    bytes_case("offsets-gap-at-end", "belong to no tensor", lambda raw: raw + b"\0" * 16),
    header_case("offsets-beyond-file", "run beyond the end of the data", _beyond),
    header_case(
        "offsets-reversed", "needs 1024 bytes but data_offsets", _entry(Q0_A, "data_offsets", [1024, 0])
    ),
    header_case(
        "offsets-negative", "data_offsets must be two non-negative", _entry(Q0_A, "data_offsets", [-1, 1023])
    ),
    header_case(
        "offsets-three", "data_offsets must be two non-negative", _entry(Q0_A, "data_offsets", [0, 1, 2])
    ),
    tensors_case("dtype-i64", "has dtype 'I64'", _retype(torch.int64)),
    tensors_case("dtype-f64", "has dtype 'F64'", _retype(torch.float64)),
    header_case("dtype-unknown", "has dtype 'Q4_K'", _entry(Q0_A, "dtype", "Q4_K")),
    header_case("dtype-not-string", "has dtype ['F32']", _entry(Q0_A, "dtype", ["F32"])),
    header_case("shape-offset-mismatch", "needs 512 bytes but data_offsets", _entry(Q0_A, "shape", [4, 32])),
    header_case("shape-negative", "shape must be a list of at most 8", _entry(Q0_A, "shape", [-4, -64])),
    header_case("shape-too-many-dims", "shape must be a list of at most 8", _entry(Q0_A, "shape", [1] * 9)),
    tensors_case("nan-in-tensor", "contains NaN or Inf", _poison(math.nan)),
    tensors_case("inf-in-tensor", "contains NaN or Inf", _poison(-math.inf)),
    tensors_case("bf16-nan-in-tensor", "contains NaN or Inf", _bf16_nan),
    tensors_case("key-embed-tokens", _NO_PROJECTION, _add({_EMBED: (4, 260)})),
    tensors_case("key-lm-head", _NO_PROJECTION, _add({"base_model.model.lm_head.lora_A.weight": (4, 64)})),
    tensors_case("key-wrong-block", _NO_PROJECTION, _rename("0.self_attn.q_proj", "0.mlp.q_proj")),
    tensors_case("key-leading-zero", _NO_PROJECTION, _rename("layers.0.", "layers.00.")),
    tensors_case("key-no-prefix", _NO_PROJECTION, _rename("base_model.model.", "")),
    tensors_case(
        "key-duplicate-default",
        "appears twice",
        _add({Q0_A.replace("A.weight", "A.default.weight"): (4, 64)}),
    ),
    tensors_case("lora-a-without-b", "lora_A and lora_B must both be present", _drop(Q0_B)),
    tensors_case("lora-b-without-a", "lora_A and lora_B must both be present", _drop(Q0_A)),
    tensors_case("a-rank-not-r", "does not have r=4 rows", _reshape(a=lambda t: t[:3], b=lambda t: t[:, :3])),
    tensors_case("ab-inner-mismatch", "inner dimension does not match", _reshape(b=lambda t: t[:, :3])),
    config_case(
        "target-without-tensors",
        "target module 'k_proj' matches no tensor",
        target_modules=["q_proj", "v_proj", "k_proj"],
    ),
    tensors_case(
        "tensor-not-targeted",
        "is not in target_modules",
        _add({f"{_K0}.lora_A.weight": (4, 64), f"{_K0}.lora_B.weight": (32, 4)}),
    ),
    config_case(
        "tensor-excluded", "exclude_modules excludes it", exclude_modules=["model.layers.0.self_attn.q_proj"]
    ),
    HostileCase("empty-safetensors", _empty_weights, "no LoRA tensors"),
    tensors_case("tensor-3d", "must be 2-D", _reshape(a=lambda t: t.unsqueeze(-1))),
    tensors_case("tensor-1d", "must be 2-D", _reshape(a=lambda t: t.flatten())),
]
