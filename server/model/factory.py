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
from server.model.llama import LlamaForServing, Weights, load_weights
from server.model.loader import Checkpoint, iter_safetensors, resolve_checkpoint
from server.model.lora_linear import LinearKwargs, MultiLoRALinear, base_linear
from server.model.quant import gguf_codes
from server.model.quant import plan as quant_plan
from server.model.quant.int_weights import Int4Weight, Int8LMHead
from server.ops import int4_native, int4_q8
from server.ops.int4_native import Int4Kernel

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from server.ops.attention_torch import AttentionOps
    from server.ops.lora_torch import AddLoRA
    from server.ops.norm_torch import NormOps

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


# auto serves a GGUF on int4 only when its GEMMs measure at least this much faster than dense ones
INT4_MIN_GAIN = 0.95

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


def pick_attention_ops(
    kernels: CpuKernelChoice | None, model_config: ModelConfig, device: torch.device
) -> AttentionOps | None:
    """CUDA: the Triton paged decode attention where triton imports. CPU: the compiled one when
    the measurement chose it. None: ``attention_torch``."""
    if device.type == "cuda":
        return _triton_attention_ops()
    if kernels is None or kernels.attention_kernel != "native":
        return None
    from server.ops import attention_native

    return attention_native.load(_cache_dir(model_config))  # None: cannot be built now, torch path


def pick_norm_ops(kernels: CpuKernelChoice | None, model_config: ModelConfig) -> NormOps | None:
    """CPU (``kernels`` chosen): the compiled residual add + RMS norm and SiLU gate, one call each
    where torch runs four to six ops (always fewer dispatches, so not timed). None: ``norm_torch``."""
    if kernels is None:
        return None
    from server.ops import norm_native

    return norm_native.load(_cache_dir(model_config))  # None: cannot be built now, torch path


def _triton_attention_ops() -> AttentionOps | None:
    from server.ops import attention_triton

    if not attention_triton.TRITON_AVAILABLE:
        log.info("decode attention: torch (attention_torch); triton is not installed")
        return None
    log.info("decode attention: Triton paged kernel (attention_triton), reading the KV cache in place")
    return attention_triton


def pick_quantization(
    model_config: ModelConfig, checkpoint: Checkpoint, device: torch.device, kernels: CpuKernelChoice | None
) -> quant_plan.QuantPlan:
    """``--quantization``: a scheme asked for (checked against the device), or auto's choice."""
    scheme = model_config.quantization
    if scheme != "auto":
        quant_plan.check_device(scheme, device)
        return quant_plan.QuantPlan(scheme, "asked for")
    if device.type != "cpu":
        return quant_plan.QuantPlan("none", f"auto: the int kernels run on CPU, not {device.type}")
    if checkpoint.gguf_path is None:
        return quant_plan.QuantPlan("none", "auto: a safetensors base is served as stored")
    if model_config.dtype is not None:
        return quant_plan.QuantPlan("none", f"auto: --dtype {model_config.dtype} asks for dense weights")
    if kernels is None:
        return quant_plan.QuantPlan("none", "auto: no start-up measurement for a model this small")
    types = gguf_codes.linear_types(checkpoint.gguf_path)
    four_bit = sum(kind in gguf_codes.INT4_TYPES for kind in types.values())
    if not four_bit:
        kinds = ", ".join(sorted(set(types.values())))
        return quant_plan.QuantPlan("none", f"auto: the GGUF's linear weights are {kinds}, none 4-bit blocks")
    shapes = cpu_tuning.GemmShapes.of(checkpoint.config)
    natives = int4_native.available(_cache_dir(model_config))
    context = f"{kernels.dtype} {kernels.gemm} native={'+'.join(k.name for k in natives) or 'none'}"
    timings = dict(cpu_tuning.remembered(
        "int4-vs-dense", shapes, context, _cache_dir(model_config),
        lambda: cpu_tuning.time_int4_against_dense(shapes, kernels.dtype, kernels.gemm, natives),
    ))  # fmt: skip
    int4_labels = [cpu_tuning.INT4_TORCH, *(cpu_tuning.int4_native_label(k) for k in natives)]
    int4_ms = min(timings.pop(label, float("inf")) for label in int4_labels)
    dense_name, dense_ms = next(iter(timings.items()), ("dense", float("inf")))
    measured = f"ms per decode pass: int4 {int4_ms:.1f}, {dense_name} {dense_ms:.1f}"
    if int4_ms < INT4_MIN_GAIN * dense_ms:
        why = f"auto: the GGUF's own 4-bit blocks are faster here ({measured})"
        return quant_plan.QuantPlan("int4", why, file_blocks_only=True)
    return quant_plan.QuantPlan("none", f"auto: dense is as fast or faster here ({measured})")


def quantized_weights(
    weights: dict[str, torch.Tensor], plan: quant_plan.QuantPlan, checkpoint: Checkpoint
) -> Weights:
    """The model's weights under ``plan`` (int4 from a GGUF's own blocks where it has them); logs one line."""
    linears = None
    if plan.scheme != "none" and checkpoint.gguf_path is not None:
        config, path = checkpoint.config, checkpoint.gguf_path
        linears = (  # int8 and nf4 quantize the dense weights: only the types are read
            gguf_codes.read_linears(path, config.num_attention_heads, config.num_key_value_heads)
            if plan.scheme == "int4"
            else gguf_codes.GgufLinears(gguf_codes.linear_types(path), {})
        )
    codes = linears.codes if linears is not None else {}
    out = quant_plan.apply(weights, plan, codes)
    from_file = [name for name, c in codes.items() if out.get(name) is c]
    said = quant_plan.summary(out, linears.types if linears is not None else None, from_file)
    log.info("quantization %s: %s (%s)", plan.scheme, said, plan.why)
    return out


def _set_int4_dequantize_rows(model: LlamaForServing, rows: int | None) -> None:
    """From ``rows`` tokens on (prefill chunks), int4 layers unpack their codes for the call."""
    for module in model.modules():
        if isinstance(module, MultiLoRALinear) and isinstance(module.quantized, Int4Weight):
            module.quantized.dequantize_min_rows = rows
    log.info("int4: calls of %s unpack the codes into dense weights in the activations' dtype (measured)",
             "no size" if rows is None else f"{rows}+ tokens")  # fmt: skip


def pick_int4_native(model_config: ModelConfig, checkpoint: Checkpoint, dtype: str) -> Int4Kernel | None:
    """The native int4 kernel (``server/ops/int4_native``) that is fastest at a decode batch on
    this CPU, with its measured ``min_rows`` (both cached per CPU); None: torch's kernel only."""
    cache_dir = _cache_dir(model_config)
    natives = int4_native.available(cache_dir)
    shapes = cpu_tuning.GemmShapes.of(checkpoint.config)
    if len(natives) > 1:
        context = f"{dtype} " + "+".join(k.name for k in natives)
        timings = cpu_tuning.remembered(
            "int4-native-kernels", shapes, context, cache_dir,
            lambda: cpu_tuning.time_int4_against_dense(shapes, dtype, None, natives),
        )  # fmt: skip
        natives.sort(key=lambda k: timings.get(cpu_tuning.int4_native_label(k), float("inf")))
    if not natives:
        return None
    kernel = natives[0]
    rows = cpu_tuning.remembered(
        "int4-rows-" + kernel.name.replace(" ", "-"), shapes, dtype, cache_dir,
        lambda: cpu_tuning.int4_native_min_rows(shapes, kernel, dtype),
    )  # fmt: skip
    if rows is None:
        log.info("int4: torch's kernel at every batch size (%s measured slower)", kernel.name)
        return None
    kernel.min_rows = rows
    log.info("int4: calls of %d+ tokens on the native kernel (%s; its own packing: 0.75 bytes per "
             "weight more memory), fewer on torch's (measured)", rows, kernel.name)  # fmt: skip
    return kernel


def pick_lm_head_int8(
    model_config: ModelConfig, checkpoint: Checkpoint, model: LlamaForServing, dtype: str
) -> Int8LMHead | None:
    """The LM head on the GGUF's own Q8_0 blocks with int8 activations where the file stores it so,
    this CPU has the kernel, and it measured faster than the dense head at a decode batch (cached
    per CPU); None: the dense head."""
    kernel = int4_q8.load(_cache_dir(model_config))
    blocks = gguf_codes.read_lm_head_q8_0(checkpoint.gguf_path) if checkpoint.gguf_path else None
    if kernel is None or blocks is None:
        return None
    if not int4_q8.fits(*blocks[0].shape):
        log.info("LM head: dense (its %d x %d Q8_0 blocks are not whole blocks of the int8 kernel)",
                 *blocks[0].shape)  # fmt: skip
        return None
    head = Int8LMHead(kernel, *blocks)
    dense = model.lm_head_gemm_weight

    def dense_head(x: torch.Tensor) -> torch.Tensor:
        return base_linear(x, dense, None, model.gemm)

    shapes, hidden = cpu_tuning.GemmShapes.of(checkpoint.config), checkpoint.config.hidden_size
    head.max_rows = max(cpu_tuning.LM_HEAD_PROBE_ROWS)  # every probe on the kernel while measuring
    found = cpu_tuning.remembered(
        "lm-head-int8-rows", shapes, f"{dtype} {model.gemm}", _cache_dir(model_config),
        lambda: cpu_tuning.lm_head_int8_max_rows(head.matmul, dense_head, hidden, dtype),
    )  # fmt: skip
    measured = (f"ms per call at 1 / 8 tokens: int8 {found['int8_1']:.2f} / {found['int8_8']:.2f}, "
                f"dense {found['dense_1']:.2f} / {found['dense_8']:.2f}")  # fmt: skip
    if not isinstance(found["max_rows"], int):
        log.info("LM head: dense (%s)", measured)
        return None
    head.max_rows = found["max_rows"]
    log.info("LM head: the GGUF's own Q8_0 blocks with int8 activations for up to %d tokens, dense "
             "above; %d MiB more memory (%s)", head.max_rows, head.num_bytes >> 20, measured)  # fmt: skip
    return head


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
    plan = pick_quantization(model_config, checkpoint, device, kernels)
    weights = quantized_weights(
        load_weights(iter_safetensors(checkpoint.path), dtype, device), plan, checkpoint
    )
    lora_dtype = kernels.torch_lora_dtype if kernels is not None and dtype != torch.float32 else None
    linear_kwargs: LinearKwargs = {
        "max_loras": engine_config.max_loras,
        "max_lora_rank": engine_config.max_lora_rank,
        "target_names": engine_config.target_modules,
        "lora_dtype": lora_dtype or (dtype if plan.scheme != "none" else None),
        "gemm": kernels.gemm if kernels is not None else "x_wt",
        "lora_op": pick_lora_op(kernels, model_config),
        "int4_native": (
            pick_int4_native(model_config, checkpoint, kernels.dtype)
            if plan.scheme == "int4" and kernels
            else None
        ),
    }
    attention_ops = pick_attention_ops(kernels, model_config, device)
    norm_ops = pick_norm_ops(kernels, model_config)
    config = checkpoint.config
    model = LlamaForServing(config, weights, max_model_len, linear_kwargs, attention_ops, norm_ops).eval()
    if plan.scheme == "int4" and kernels is not None:
        shapes, native = cpu_tuning.GemmShapes.of(checkpoint.config), linear_kwargs["int4_native"]
        serving = kernels.dtype
        context = serving if native is None else f"{serving} {native.name} from {native.min_rows}"
        rows = cpu_tuning.remembered(
            "int4-unpack-rows", shapes, context, _cache_dir(model_config),
            lambda: cpu_tuning.int4_dequantize_min_rows(shapes, native, serving),
        )  # fmt: skip
        _set_int4_dequantize_rows(model, rows)
    if plan.scheme == "int4" and kernels is not None and checkpoint.gguf_path is not None:
        model.lm_head_int8 = pick_lm_head_int8(model_config, checkpoint, model, kernels.dtype)
    log.info("loaded %s on %s in %s, max_model_len=%d", checkpoint.name, device, dtype, max_model_len)
    return LoadedModel(model, checkpoint, dtype, device, max_model_len, kernels)
