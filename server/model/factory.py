"""Builds the serving model from a resolved checkpoint: dtype, device, context limit, LoRA slots."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.config import EngineConfig, ModelConfig
from server.model.llama import LlamaForServing, load_weights
from server.model.loader import Checkpoint, iter_safetensors, resolve_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForServing
    checkpoint: Checkpoint
    dtype: torch.dtype
    device: torch.device
    max_model_len: int


def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def model_context_limit(config, requested: int | None) -> int:
    """max_model_len: the request, bounded by the model's positions (and sliding window, if any)."""
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)  # no sliding-window attention here: stay inside the window
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds what the model supports ({limit} tokens)")
    return requested or limit


def load_model(model_config: ModelConfig, engine_config: EngineConfig) -> LoadedModel:
    checkpoint = resolve_checkpoint(model_config)
    device = pick_device(model_config.device)
    dtype = pick_dtype(model_config.dtype, device)
    max_model_len = model_context_limit(checkpoint.config, engine_config.max_model_len)
    weights = load_weights(iter_safetensors(checkpoint.path), dtype, device)
    lora_kwargs = {
        "max_loras": engine_config.max_loras,
        "max_lora_rank": engine_config.max_lora_rank,
        "target_names": engine_config.target_modules,
    }
    model = LlamaForServing(checkpoint.config, weights, max_model_len, lora_kwargs).eval()
    log.info("loaded %s on %s in %s, max_model_len=%d", checkpoint.name, device, dtype, max_model_len)
    return LoadedModel(model, checkpoint, dtype, device, max_model_len)
