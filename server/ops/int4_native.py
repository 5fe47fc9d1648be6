"""The native int4 GEMM kernels of server/ops behind one interface, and loading the ones this CPU has.

Each is a C call over group-wise int4 codes in its own packing (``int4_amx``: AMX bf16 tiles;
``int4_q8``: int8 activations on AVX2 integer dot products). ``Int4Weight`` serves calls of at least
``kernel.min_rows`` tokens on one of them (chosen by measurement at start, ``factory``), fewer on
torch's kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from server.ops import int4_amx, int4_q8


class Int4Kernel(Protocol):
    name: str  # for logs and timings
    min_rows: int  # calls of fewer tokens go to torch's kernel

    def fits(self, out_features: int, in_features: int) -> bool: ...

    def pack(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor: ...

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor: ...


def available(cache_dir: Path | str | None = None) -> list[Int4Kernel]:
    """The kernels this CPU and compiler can run (each compiled on first use), AMX first."""
    kernels: list[Int4Kernel | None] = [int4_amx.load(cache_dir), int4_q8.load(cache_dir)]
    return [k for k in kernels if k is not None]
