"""The decoder layer's element-wise glue as one C call each: ``norm_torch``'s functions, compiled.

``NativeNorms.add_rms_norm`` and ``.silu_mul`` have the signatures and meaning of
``norm_torch.add_rms_norm`` and ``.silu_mul``. Torch runs four to six small ops for each (pow,
mean, add, rsqrt, two products; a slice, SiLU and a product), each a dispatch and an allocation
that cost more than the arithmetic at decode sizes (~5-30 us each, ~60 norms per step); these run
one loop over the rows. fp32 sums of squares in a different order than torch's, so the norms
match it to fp32 rounding, not bit for bit.

The C source (``norm_native.c``) is built on first use for this CPU and cached under
``<cache_dir>/kernels`` (``native_build``); ``load()`` returns None (one warning logged) where
that is not possible, and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from server.ops import norm_torch
from server.ops.native_build import BASE_CFLAGS, NativeSource, float_bits, load_library

SOURCE = NativeSource("norm_native", Path(__file__).with_name("norm_native.c"), BASE_CFLAGS)
_BF16 = {torch.float32: 0, torch.bfloat16: 1}
_NORM_ARGS = struct.Struct("=9q")  # out, residual out, hidden, residual in, weight, rows, H, eps bits, bf16
_SILU_ARGS = struct.Struct("=6q")  # out, gate_up, gate_up row stride, rows, I, bf16


def load(cache_dir: Path | str | None = None) -> NativeNorms | None:
    """The compiled kernels (built on first use, then cached on disk), or None where they cannot be."""
    lib = load_library(SOURCE, cache_dir)
    if lib is None:
        return None
    for fn in (lib.loraplex_add_rms_norm, lib.loraplex_silu_mul):
        fn.argtypes, fn.restype = (ctypes.c_char_p,), ctypes.c_int
    return NativeNorms(lib)


class NativeNorms:
    """The loaded kernels. Inputs they do not take (another device or dtype, strided rows) go to
    ``norm_torch``, so a caller never needs to know which ran."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._norm = lib.loraplex_add_rms_norm
        self._silu_mul = lib.loraplex_silu_mul

    def add_rms_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm_torch.add_rms_norm``, with the sum written into ``residual`` itself (returned)."""
        dtype = hidden.dtype
        takes = _takes(hidden, dtype) and _takes(weight, dtype) and hidden.dim() == 2
        takes = takes and weight.shape[0] == hidden.shape[1]
        if not takes or (residual is not None and not _takes(residual, dtype)):
            return norm_torch.add_rms_norm(hidden, residual, weight, eps)
        if residual is not None and residual.shape != hidden.shape:
            raise ValueError(f"residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
        rows, size = hidden.shape
        out = torch.empty_like(hidden)
        summed = residual.data_ptr() if residual is not None else 0
        args = _NORM_ARGS.pack(
            out.data_ptr(), summed, hidden.data_ptr(), summed, weight.data_ptr(), rows, size,
            float_bits(eps), _BF16[dtype],
        )  # fmt: skip
        self._norm(args)
        return out, hidden if residual is None else residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``norm_torch.silu_mul``."""
        dtype = gate_up.dtype
        rows_ok = gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.stride(0) >= gate_up.shape[1]
        if dtype not in _BF16 or not gate_up.is_cpu or not rows_ok or gate_up.shape[1] % 2:
            return norm_torch.silu_mul(gate_up)
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=dtype)
        stride = gate_up.stride(0)
        args = _SILU_ARGS.pack(out.data_ptr(), gate_up.data_ptr(), stride, rows, inter, _BF16[dtype])
        self._silu_mul(args)
        return out


def _takes(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A contiguous CPU tensor of ``dtype``, one the kernels take (fp32 or bf16)."""
    return t.dtype == dtype and dtype in _BF16 and t.is_cpu and t.is_contiguous()
