"""Which linear weights of a checkpoint are served quantized, and how (``--quantization``).

    none   every weight dense, in the serving dtype
    int4   every linear weight as int4 codes: a GGUF file's own Q4_0/Q4_1 blocks where it has them
           (exact), else min-max codes of the dense weight in groups of 32 inputs
    int8   every linear weight as per-channel int8 codes of the dense weight
    nf4    every linear weight as bitsandbytes NF4 (blocks of 64), exactly as transformers' 4-bit
           loading quantizes it, so QLoRA adapters see the base they were trained on (CPU or CUDA)
    auto   int4 from the file's own blocks for a GGUF base whose linear weights are Q4_0/Q4_1, when
           the start-up measurement finds the int4 GEMMs faster than the dense ones; else none

Embeddings, the LM head, norms and biases stay dense. The int kernels are torch's CPU ones, so a
scheme on CUDA is refused at start (auto serves dense there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.quant.int_weights import Codes, Int4Codes, quantize_int4, quantize_int8
from server.model.quant.nf4 import NF4Codes, quantize_nf4

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_SCHEMES = ("int4", "int8")


@dataclass(frozen=True)
class QuantPlan:
    scheme: str  # what serves: none, int4 or int8
    why: str  # one line for the start-up log


def is_linear_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f"{n}.weight" for n in LINEAR_NAMES))


def check_device(scheme: str, device: torch.device) -> None:
    """ValueError naming the flag for a scheme this device cannot run."""
    if scheme in CPU_SCHEMES and device.type != "cpu":
        raise ValueError(
            f"--quantization {scheme} runs on CPU only (torch's weight-only int kernels); "
            f"on {device.type} use --quantization none"
        )


def apply(
    weights: dict[str, torch.Tensor], scheme: str, file_codes: dict[str, Int4Codes] | None = None
) -> dict[str, torch.Tensor | Codes]:
    """``weights`` with every linear weight replaced by its codes under ``scheme`` (none: as is).
    ``file_codes``: a GGUF file's own int4 codes by name, used as they are for int4."""
    if scheme == "none":
        return dict(weights)
    out: dict[str, torch.Tensor | Codes] = {}
    for name, tensor in weights.items():
        if not is_linear_weight(name):
            out[name] = tensor
        elif scheme == "int4":
            out[name] = (file_codes or {}).get(name) or quantize_int4(tensor)
        elif scheme == "nf4":
            out[name] = quantize_nf4(tensor)
        else:
            out[name] = quantize_int8(tensor)
    return out


def summary(weights: dict[str, torch.Tensor | Codes], from_file: int) -> str:
    """What is quantized and the bytes of the linear weights one decode step reads."""
    linear = {n: w for n, w in weights.items() if is_linear_weight(n)}
    quantized = [w for w in linear.values() if not isinstance(w, torch.Tensor)]
    step_bytes = sum(_bytes(w) for w in linear.values())
    per_step = f"{step_bytes / 2**20:.0f} MiB of linear weights per decode step"
    if not quantized:
        return f"{len(linear)} linear weights dense; {per_step}"
    kind = type(quantized[0]).__name__.removesuffix("Codes").lower()
    source = f", {from_file} from the file's own blocks" if from_file else ""
    return f"{len(quantized)} of {len(linear)} linear weights {kind}{source}; {per_step}"


def _bytes(weight: torch.Tensor | Codes) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    if isinstance(weight, Int4Codes):
        return weight.codes.numel() // 2 + weight.scale.numel() * 2 * 2  # packed nibbles + bf16 scale/zero
    if isinstance(weight, NF4Codes):
        return weight.packed.numel() + weight.absmax.numel() * 4
    return weight.codes.numel() + weight.scale.numel() * 2
