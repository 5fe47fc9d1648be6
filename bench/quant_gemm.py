"""The layer GEMMs of one decode step, dense against weight-only int4/int8, by tokens in the step.

Run:  .venv/bin/python bench/quant_gemm.py                 (SmolLM2-135M's shapes: 30 layers of
                                                             q|k|v, o, gate|up, down; 2 threads)
      .venv/bin/python bench/quant_gemm.py --tokens 1 8 64  (other step sizes)

Random weights of the model's shapes; each kernel runs all 120 GEMMs per pass, ms per pass is the
mean of --repeats passes after one warm-up. Kernels: dense fp32 and bf16 (F.linear), bf16 on
oneDNN-packed weights, torch's int4 (``_weight_int4pack_mm_for_cpu``, server/model/quant/) and
int8 (``_weight_int8pack_mm``) with bf16 activations, and the native int4 kernels this CPU has
(``server/ops/int4_native.py``: AMX bf16 tiles, int8 activations on AVX2). No timing here is
asserted on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from server.model.quant.int_weights import Int4Weight, Int8Weight, quantize_int4, quantize_int8
from server.ops import int4_native
from server.ops.cpu_info import cpu_identity

SMOLLM2_LAYER = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def timed(one_pass: Callable[[], object], repeats: int) -> float:
    one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return (time.perf_counter() - start) / repeats * 1e3


Gemm = Callable[[torch.Tensor], torch.Tensor]


def _dense(weight: torch.Tensor) -> Gemm:
    return lambda x: F.linear(x.to(weight.dtype), weight)


def _onednn(weight: torch.Tensor) -> Gemm:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), packed, None, "none", [], "")


def _onednn_kernels(dense: list[torch.Tensor]) -> dict[str, list[Gemm]]:
    """oneDNN-packed columns in the dtypes this CPU packs (bf16 needs AVX512-BW or AVX-NE-CONVERT)."""
    kernels = {}
    for label, dtype in (("fp32 oneDNN", torch.float32), ("bf16 oneDNN", torch.bfloat16)):
        try:
            kernels[label] = [_onednn(w.to(dtype)) for w in dense]
        except RuntimeError as error:  # a torch without oneDNN, or a dtype this CPU cannot pack
            print(f"{label}: not run ({str(error).splitlines()[0]})")
    return kernels


def _one_pass(gemms: list[Gemm], inputs: list[torch.Tensor]) -> Callable[[], object]:
    return lambda: [gemm(x) for gemm, x in zip(gemms, inputs, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 360])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SMOLLM2_LAYER * args.layers
    dense = [torch.randn(n, k) * 0.02 for n, k in shapes]
    kernels = {
        "fp32": [_dense(w) for w in dense],
        "bf16": [_dense(w.bfloat16()) for w in dense],
        **_onednn_kernels(dense),
        "int4 (bf16 act.)": [Int4Weight(quantize_int4(w), torch.bfloat16).matmul for w in dense],
        "int4 (fp32 act.)": [Int4Weight(quantize_int4(w), torch.float32).matmul for w in dense],
        "int8 (bf16 act.)": [Int8Weight(quantize_int8(w), torch.bfloat16).matmul for w in dense],
    }
    for native in int4_native.available():
        native.min_rows = 1  # every call on the native kernel
        kernels[f"int4 {native.name}"] = [
            Int4Weight(quantize_int4(w), torch.bfloat16, native).matmul for w in dense
        ]
    print(f"machine: {cpu_identity()}, torch {torch.__version__}, {args.threads} threads")
    print("| tokens | " + " | ".join(kernels) + " |")
    print("| ---: |" + " ---: |" * len(kernels))
    with torch.inference_mode():
        for tokens in args.tokens:
            inputs = {k: torch.randn(tokens, k) for _, k in SMOLLM2_LAYER}  # fp32: each kernel casts
            xs = [inputs[w.shape[1]] for w in dense]
            row = [timed(_one_pass(fns, xs), args.repeats) for fns in kernels.values()]
            print(f"| {tokens} | " + " | ".join(f"{ms:.1f}" for ms in row) + " |")
    print("(ms per pass of the step's layer GEMMs)")


if __name__ == "__main__":
    main()
