"""Builds the serving model from a resolved checkpoint: dtype, device, context limit, LoRA slots."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.config import EngineConfig, ModelConfig, default_cache_dir
from server.model import cpu_tuning
from server.model.cpu_tuning import CpuKernelChoice
from server.model.host_memory import keep_freed_memory
from server.model.llama import LlamaForServing, load_weights
from server.model.loader import Checkpoint, iter_safetensors, resolve_checkpoint
from server.model.lora_linear import LinearKwargs

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from server.ops.attention_torch import AttentionOps
    from server.ops.lora_torch import AddLoRA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForServing
    checkpoint: Checkpoint
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    kernels: CpuKernelChoice | None = None  # what the CPU start-up measurement chose (None on GPU)


def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(
    requested: str | None, device: torch.device, kernels: CpuKernelChoice | None = None
) -> torch.dtype:
    """The user's dtype; else the measured one on CPU (fp32 where untuned), bf16 on CUDA."""
    if requested is not None:
        dtype: torch.dtype = getattr(torch, requested)  # config validated the name
        return dtype
    if device.type == "cuda":
        return torch.bfloat16
    return kernels.torch_dtype if kernels is not None else torch.float32


# Below this many bytes of decode GEMM weights (tiny test models) timings are noise: no tuning.
MIN_TUNED_WEIGHT_BYTES = 16 << 20


def pick_cpu_kernels(model_config: ModelConfig, checkpoint: Checkpoint) -> CpuKernelChoice | None:
    """Measure (or read the cached) CPU kernel choices for this model; None for tiny models."""
    shapes = cpu_tuning.GemmShapes.of(checkpoint.config)
    if sum(o * i for o, i in shapes.layer) * shapes.num_layers * 4 < MIN_TUNED_WEIGHT_BYTES:
        return None
    kernels = cpu_tuning.choose(shapes, model_config.dtype, _cache_dir(model_config))
    torch.set_num_threads(kernels.num_threads)
    log.info("%s", kernels.describe())
    return kernels


def model_context_limit(config: PretrainedConfig, requested: int | None) -> int:
    """max_model_len: the request, bounded by the model's positions (and sliding window, if any)."""
    limit: int = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)  # no sliding-window attention here: stay inside the window
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds what the model supports ({limit} tokens)")
    return requested or limit


def pick_lora_op(kernels: CpuKernelChoice | None, model_config: ModelConfig) -> AddLoRA | None:
    """The compiled side path when the measurement chose it, for decode and prefill steps alike:
    it builds no oneDNN kernel per new segment length, as torch's bf16 products do."""
    if kernels is None or kernels.lora_kernel != "native":
        return None
    from server.ops import lora_native

    native = lora_native.load(_cache_dir(model_config))
    if native is None:
        return None  # cannot be built now: the torch path
    native.num_threads = kernels.lora_threads
    return native.add_lora


def pick_attention_ops(kernels: CpuKernelChoice | None, model_config: ModelConfig) -> AttentionOps | None:
    """The compiled decode attention when the measurement chose it; None: ``attention_torch``."""
    if kernels is None or kernels.attention_kernel != "native":
        return None
    from server.ops import attention_native

    return attention_native.load(_cache_dir(model_config))  # None: cannot be built now, torch path


def _cache_dir(model_config: ModelConfig) -> Path:
    return Path(model_config.cache_dir).expanduser() if model_config.cache_dir else default_cache_dir()


def load_model(model_config: ModelConfig, engine_config: EngineConfig) -> LoadedModel:
    checkpoint = resolve_checkpoint(model_config)
    device = pick_device(model_config.device)
    kernels = pick_cpu_kernels(model_config, checkpoint) if device.type == "cpu" else None
    if device.type == "cpu":
        keep_freed_memory()  # a step's large tensors come back from the heap, not fresh pages
    dtype = pick_dtype(model_config.dtype, device, kernels)
    max_model_len = model_context_limit(checkpoint.config, engine_config.max_model_len)
    weights = load_weights(iter_safetensors(checkpoint.path), dtype, device)
    linear_kwargs: LinearKwargs = {
        "max_loras": engine_config.max_loras,
        "max_lora_rank": engine_config.max_lora_rank,
        "target_names": engine_config.target_modules,
        "lora_dtype": kernels.torch_lora_dtype if kernels is not None and dtype != torch.float32 else None,
        "gemm": kernels.gemm if kernels is not None else "x_wt",
        "lora_op": pick_lora_op(kernels, model_config),
    }
    attention_ops = pick_attention_ops(kernels, model_config)
    model = LlamaForServing(checkpoint.config, weights, max_model_len, linear_kwargs, attention_ops).eval()
    log.info("loaded %s on %s in %s, max_model_len=%d", checkpoint.name, device, dtype, max_model_len)
    return LoadedModel(model, checkpoint, dtype, device, max_model_len, kernels)
