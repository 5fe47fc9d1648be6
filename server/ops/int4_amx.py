"""Group-wise int4 GEMMs on Intel AMX bf16 tiles in one C call: ``int4_amx.c``.

``pack(codes, scale, minimum)`` lays a weight out as the C side reads it (one 384-byte record per
block of 16 outputs and group of 32 inputs: the codes in AMX's pair-interleaved order, then the
block's fp32 scales and minimums, 0.75 bytes per weight). ``Int4Amx.matmul(x, packed)`` is
``x · Wᵀ`` with each weight dequantized in fp32 and rounded once to bf16: the products of the
dense bf16 model. Its cost hardly grows with the rows (each record is unpacked once per 64 rows),
so it beats torch's int4 kernel from a few rows on, and loses to it at one or two.

The C source is compiled on first use for the CPU it runs on (``native_build``); ``load()`` is
None where the CPU or the compiler has no AMX-BF16, or the kernel refuses the tile state.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from pathlib import Path

import torch

from server.ops.native_build import BASE_CFLAGS, NativeSource, load_library

log = logging.getLogger(__name__)

SOURCE = NativeSource("int4_amx", Path(__file__).with_name("int4_amx.c"), (*BASE_CFLAGS, "-fopenmp"))
GROUP = 32  # inputs per group (GGUF's Q4_0 / Q4_1 blocks)
OUT_TILE = 16  # outputs per record
RECORD_BYTES = 256 + 2 * 64
DEFAULT_MIN_ROWS = 4  # where torch's int4 kernel stops winning on a 2-core Sapphire Rapids
_CALL_ARGS = struct.Struct("=10q")  # y, y row stride, x, x row stride, w, M, N, K, y is bf16, threads


def load(cache_dir: Path | str | None = None) -> Int4Amx | None:
    """The compiled kernel, or None (where there is no AMX-BF16, or no compiler: logged once)."""
    lib = load_library(SOURCE, cache_dir)
    if lib is None:
        return None
    lib.int4_amx_matmul.argtypes = (ctypes.c_char_p,)
    lib.int4_amx_matmul.restype = ctypes.c_int
    if not lib.int4_amx_available():
        return None  # not an AMX CPU: the torch kernel serves, nothing to warn about
    if lib.int4_amx_init() != 0:
        log.warning("int4 AMX kernel unavailable: the OS refused the AMX tile state (arch_prctl)")
        return None
    return Int4Amx(lib)


def fits(out_features: int, in_features: int) -> bool:
    """Whether a weight of this shape can be packed: whole blocks of 16 outputs and 32 inputs."""
    return out_features % OUT_TILE == 0 and in_features % GROUP == 0 and out_features > 0


def pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """[N/16, K/32, 384] uint8 records from codes [N, K] (uint8 in [0, 15]), scale and minimum [N, K/32]."""
    n, k = codes.shape
    if not fits(n, k) or scale.shape != (n, k // GROUP) or minimum.shape != scale.shape:
        raise ValueError(
            f"int4 AMX: codes {tuple(codes.shape)} need blocks of {OUT_TILE} outputs, {GROUP} inputs"
        )
    blocks, groups = n // OUT_TILE, k // GROUP
    q = codes.to(torch.uint8).view(blocks, OUT_TILE, groups, GROUP // 2, 2)  # [nb, c, g, pair, e]
    low = q[:, : OUT_TILE // 2].permute(0, 2, 3, 1, 4).reshape(blocks, groups, 16, 16)  # outputs 0-7
    high = q[:, OUT_TILE // 2 :].permute(0, 2, 3, 1, 4).reshape(blocks, groups, 16, 16)  # outputs 8-15
    nibbles = (low | (high << 4)).reshape(blocks, groups, 256)

    def per_block(values: torch.Tensor) -> torch.Tensor:  # [N, G] fp32 -> [nb, g, 64] bytes
        return values.float().view(blocks, OUT_TILE, groups).permute(0, 2, 1).contiguous().view(torch.uint8)

    return torch.cat([nibbles, per_block(scale), per_block(minimum)], dim=2).contiguous()


class Int4Amx:
    """The loaded kernel; ``num_threads`` threads per call (default: torch's thread count), for
    calls of at least ``min_rows`` tokens (``Int4Weight`` reads it at every call)."""

    name = "AMX bf16 tiles"
    fits = staticmethod(fits)
    pack = staticmethod(pack)

    def __init__(
        self, lib: ctypes.CDLL, num_threads: int | None = None, min_rows: int = DEFAULT_MIN_ROWS
    ) -> None:
        self._matmul = lib.int4_amx_matmul
        self.num_threads = num_threads
        self.min_rows = min_rows  # calls of fewer tokens keep torch's kernel (measured at start)

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] (CPU; cast to bf16 when it is not) · Wᵀ → [M, N] in ``out_dtype`` (fp32 or bf16).

        ``packed``: [N/16, K/32, 384] uint8 from ``pack``, contiguous. ValueError for anything else.
        """
        if x.dtype != torch.bfloat16 or (x.dim() == 2 and x.stride(-1) != 1):
            x = x.to(torch.bfloat16).contiguous()
        _check(x, packed, out_dtype)
        m, k = x.shape
        n = packed.shape[0] * OUT_TILE
        y = torch.empty(m, n, dtype=out_dtype)
        if m == 0:
            return y
        threads = self.num_threads or torch.get_num_threads()
        is_bf16 = int(out_dtype == torch.bfloat16)
        args = _CALL_ARGS.pack(
            y.data_ptr(), n, x.data_ptr(), x.stride(0), packed.data_ptr(), m, n, k, is_bf16, threads
        )
        self._matmul(args)
        return y


def _check(x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype) -> None:
    if not x.is_cpu or x.dim() != 2:
        raise ValueError(f"int4 AMX kernel: x must be a 2-D CPU tensor, got {tuple(x.shape)} on {x.device}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"int4 AMX kernel: output dtype {out_dtype} unsupported (fp32 or bf16)")
    ok = packed.dtype == torch.uint8 and packed.is_cpu and packed.is_contiguous() and packed.dim() == 3
    if not ok or packed.shape[2] != RECORD_BYTES:
        raise ValueError(
            f"int4 AMX kernel: packed weights must be [N/16, K/32, {RECORD_BYTES}] uint8, contiguous"
        )
    if packed.shape[1] * GROUP != x.shape[1]:
        raise ValueError(f"int4 AMX kernel: x has {x.shape[1]} inputs, the weight {packed.shape[1] * GROUP}")
    if x.shape[0] > 1 and x.stride(0) < x.shape[1]:
        raise ValueError("int4 AMX kernel: rows of x overlap")
