"""Which linear weights of a checkpoint are served quantized, and how (``--quantization``).

    none   every weight dense, in the serving dtype
    int4   every linear weight as int4 codes: a GGUF file's own Q4_0/Q4_1/Q4_K blocks where it has
           them (exact), else min-max codes of the dense weight in groups of 32 inputs (so a GGUF's
           Q5/Q6_K/Q8_0 weights are re-quantized to 4 bits: asked for, and logged)
    int8   every linear weight as per-channel int8 codes of the dense weight
    nf4    every linear weight as bitsandbytes NF4 (blocks of 64), exactly as transformers' 4-bit
           loading quantizes it, so QLoRA adapters see the base they were trained on (CPU or CUDA)
    auto   for a GGUF base with Q4_0/Q4_1/Q4_K linear weights, when the start-up measurement finds
           the int4 GEMMs faster than the dense ones: those weights on their own blocks, every other
           one (a Q4_K_M file's Q6_K weights, say) dense in the serving dtype, never re-quantized;
           else none

Embeddings, the LM head, norms and biases stay dense. The int kernels are torch's CPU ones, so a
scheme on CUDA is refused at start (auto serves dense there).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from server.model.quant.int_weights import Codes, Int4Codes, quantize_int4, quantize_int8
from server.model.quant.nf4 import NF4Codes, quantize_nf4

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_SCHEMES = ("int4", "int8")


@dataclass(frozen=True)
class QuantPlan:
    scheme: str  # what serves: none, int4, int8 or nf4
    why: str  # one line for the start-up log
    file_blocks_only: bool = False  # int4 only where the file has 4-bit blocks; the rest stays dense


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
    weights: dict[str, torch.Tensor], plan: QuantPlan, file_codes: dict[str, Int4Codes] | None = None
) -> dict[str, torch.Tensor | Codes]:
    """``weights`` with every linear weight replaced by its codes under ``plan`` (none: as is).
    ``file_codes``: a GGUF file's own int4 codes by name, used as they are for int4; with
    ``plan.file_blocks_only`` a weight without them stays the dense tensor it is."""
    scheme, file_codes = plan.scheme, file_codes or {}
    if scheme == "none":
        return dict(weights)
    if plan.file_blocks_only:
        file_codes = whole_fused_modules(file_codes)
    out: dict[str, torch.Tensor | Codes] = {}
    for name, tensor in weights.items():
        if not is_linear_weight(name) or (plan.file_blocks_only and name not in file_codes):
            out[name] = tensor
        elif scheme == "int4":
            out[name] = file_codes.get(name) or quantize_int4(tensor)
        elif scheme == "nf4":
            out[name] = quantize_nf4(tensor)
        else:
            out[name] = quantize_int8(tensor)
    return out


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # the model's fused modules


def whole_fused_modules(codes: dict[str, Int4Codes]) -> dict[str, Int4Codes]:
    """``codes`` less the weights of a fused module (q|k|v, gate|up) some of whose projections have
    none: one module's projections are stored one way (a Q4_K_M file's Q6_K v_proj keeps its
    layer's q and k dense too)."""

    def siblings(name: str) -> list[str]:
        projection = name.split(".")[-2]
        group = next((g for g in FUSED if projection in g), (projection,))
        return [name.replace(f".{projection}.", f".{p}.") for p in group]

    return {name: c for name, c in codes.items() if all(s in codes for s in siblings(name))}


def summary(weights: dict[str, torch.Tensor | Codes], file_types: dict[str, str] | None = None,
            from_file: Iterable[str] = ()) -> str:  # fmt: skip
    """What is quantized and the bytes of the linear weights one decode step reads, in one line.
    ``file_types``: a GGUF's ggml type per linear weight; ``from_file``: the names served on the
    file's own blocks. Weights from other ggml types are counted by type, dense or re-quantized."""
    linear = {n: w for n, w in weights.items() if is_linear_weight(n)}
    quantized = {n for n, w in linear.items() if not isinstance(w, torch.Tensor)}
    step_bytes = sum(_bytes(w) for w in linear.values())
    per_step = f"{step_bytes / 2**20:.0f} MiB of linear weights per decode step"
    if not quantized:
        return f"{len(linear)} linear weights dense; {per_step}"
    kind = type(linear[next(iter(quantized))]).__name__.removesuffix("Codes").lower()
    own = set(from_file)
    parts = [f"{len(quantized)} of {len(linear)} linear weights {kind}"]
    if own:
        parts.append(f"{len(own)} on the file's own {_by_type(own, file_types)} blocks")
    if file_types and (requantized := quantized - own):
        parts.append(f"{len(requantized)} re-quantized from {_by_type(requantized, file_types)}")
    if file_types and (dense := set(linear) - quantized):
        parts.append(f"{len(dense)} dense from {_by_type(dense, file_types)}")
    return f"{', '.join(parts)}; {per_step}"


def _by_type(names: set[str], file_types: dict[str, str] | None) -> str:
    """``Q4_K`` or ``Q6_K ×30 + Q8_0 ×2``: the ggml types of ``names``."""
    counts = Counter((file_types or {}).get(name, "dense") for name in names)
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{kind} ×{n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _bytes(weight: torch.Tensor | Codes) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    if isinstance(weight, Int4Codes):
        return weight.codes.numel() // 2 + weight.scale.numel() * 2 * 2  # packed nibbles + bf16 scale/zero
    if isinstance(weight, NF4Codes):
        return weight.packed.numel() + weight.absmax.numel() * 4
    return weight.codes.numel() + weight.scale.numel() * 2
