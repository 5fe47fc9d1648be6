"""Group-wise int4 GEMMs with int8 activations on AVX2 integer dot products, in one C call: ``int4_q8.c``.

``pack(codes, scale, minimum)`` lays a weight out as the C side reads it: per block of 8 outputs
and group of 32 inputs one 192-byte record, the 8 outputs' codes interleaved by 4 inputs (two per
byte), then their fp32 scales and minimums (0.75 bytes per weight). ``Int4Q8.matmul(x, packed)`` is
``x · Wᵀ`` with each group of 32 activations of a row quantized to int8 on its own scale: the exact
product of the weight and the quantized activations (llama.cpp's Q4_1 x Q8_1 products). On CPUs
without AMX this is the int4 kernel that does not pay for its weights' unpacking once per token,
as torch's does with fp32 activations (50x slower than with bf16 ones on the machines measured).
``pack_int8`` / ``matmul_int8`` do the same over int8 codes (GGUF's Q8_0), 288-byte records.

The C source is compiled on first use for the CPU it runs on (``native_build``); ``load()`` is
None where the CPU or the compiler has no AVX2 and FMA.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from server.ops.native_build import BASE_CFLAGS, NativeSource, load_library

SOURCE = NativeSource("int4_q8", Path(__file__).with_name("int4_q8.c"), (*BASE_CFLAGS, "-fopenmp"))
GROUP = 32  # inputs per group (GGUF's Q4_0 / Q4_1 blocks)
BLOCK_OUTS = 8  # int4 outputs per record, one per int32 lane of an AVX2 register
RECORD_BYTES = 128 + 2 * 4 * BLOCK_OUTS  # an int4 record's codes, then its fp32 scales and minimums
INT8_RECORD_BYTES = 256 + 4 * BLOCK_OUTS  # an int8 record's codes, then its fp32 scales
# y, y row stride, x, x row stride, w, M, N, K, y bf16, x bf16, threads, int8 weights
_CALL_ARGS = struct.Struct("=12q")
_DTYPES = (torch.float32, torch.bfloat16)


def load(cache_dir: Path | str | None = None) -> Int4Q8 | None:
    """The compiled kernel, or None (no AVX2 + FMA here, or no compiler: logged once)."""
    lib = load_library(SOURCE, cache_dir)
    if lib is None or not lib.int4_q8_available():
        return None
    lib.int4_q8_matmul.argtypes = (ctypes.c_char_p,)
    lib.int4_q8_matmul.restype = ctypes.c_int
    return Int4Q8(lib)


def fits(out_features: int, in_features: int) -> bool:
    """Whether an int4 weight of this shape can be packed: whole blocks of 8 outputs, 32 inputs."""
    whole_blocks = out_features % BLOCK_OUTS == 0 and in_features % GROUP == 0
    return out_features > 0 and in_features > 0 and whole_blocks


def pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """[N/8, K/32, 192] uint8 records from codes [N, K] (uint8 in [0, 15]), scale and minimum [N, K/32]:
    byte 32·j + 4·o + i of a record's codes holds input 4·j + i of the group for output o in its
    low nibble and input 16 + 4·j + i in its high one."""
    n, k = codes.shape
    if not fits(n, k) or scale.shape != (n, k // GROUP) or minimum.shape != scale.shape:
        raise ValueError(
            f"int4 q8: codes {tuple(codes.shape)} need blocks of {BLOCK_OUTS} outputs, {GROUP} inputs"
        )
    blocks, groups = n // BLOCK_OUTS, k // GROUP
    q = codes.to(torch.uint8).view(blocks, BLOCK_OUTS, groups, 2, 4, 4)  # [B, o, G, half, j, i]
    nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [B, o, G, j, i]
    scales, minimums = _per_record(scale, blocks, groups), _per_record(minimum, blocks, groups)
    return torch.cat([_interleaved(nibbles), scales, minimums], dim=2).contiguous()


def _interleaved(codes: torch.Tensor) -> torch.Tensor:
    """[B, o, G, j, i] code bytes (block, output, group, run of 4 inputs, input in the run) →
    [B, G, j·o·i]: per record, each run of 4 inputs for the 8 outputs side by side."""
    blocks, _, groups = codes.shape[:3]
    return codes.permute(0, 2, 3, 1, 4).reshape(blocks, groups, -1)


def _per_record(values: torch.Tensor, blocks: int, groups: int) -> torch.Tensor:
    """[N, G] fp32 values → [N/8, G, 32] bytes: each record's 8 outputs' values."""
    return values.float().view(blocks, BLOCK_OUTS, groups).transpose(1, 2).contiguous().view(torch.uint8)


def pack_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N/8, K/32, 288] uint8 records from int8 codes [N, K] and fp32 scales [N, K/32] (GGUF's Q8_0
    blocks: W[n, k] = scale[n, k // 32] · codes[n, k]): byte 32·j + 4·o + i of a record's codes is
    input 4·j + i of the group for output o, then the 8 outputs' scales."""
    n, k = codes.shape
    if codes.dtype != torch.int8 or not fits(n, k) or scale.shape != (n, k // GROUP):
        raise ValueError(
            f"int8 q8: codes {tuple(codes.shape)} {codes.dtype} need int8, blocks of {BLOCK_OUTS} "
            f"outputs and {GROUP} inputs"
        )
    blocks, groups = n // BLOCK_OUTS, k // GROUP
    q = codes.view(torch.uint8).view(blocks, BLOCK_OUTS, groups, 8, 4)  # [B, o, G, j, i]
    return torch.cat([_interleaved(q), _per_record(scale, blocks, groups)], dim=2).contiguous()


class Int4Q8:
    """The loaded kernel; ``num_threads`` threads per call (default: torch's thread count), for
    calls of at least ``min_rows`` tokens (``Int4Weight`` reads it at every call)."""

    name = "int8 activations on AVX2"
    fits = staticmethod(fits)
    pack = staticmethod(pack)

    def __init__(self, lib: ctypes.CDLL, num_threads: int | None = None, min_rows: int = 1) -> None:
        self._matmul = lib.int4_q8_matmul
        self.num_threads = num_threads
        self.min_rows = min_rows  # calls of fewer tokens keep torch's kernel (measured at start)

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] (CPU, fp32 or bf16; other dtypes are cast to fp32) · Wᵀ → [M, N] in ``out_dtype``
        (fp32 or bf16). ``packed``: [N/8, K/32, 192] uint8 from ``pack``. ValueError for anything else."""
        return self._call(x, packed, out_dtype, int8=False)

    def matmul_int8(self, x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """As ``matmul``, over int8 weights: ``packed`` [N/8, K/32, 288] uint8 from ``pack_int8``."""
        return self._call(x, packed, out_dtype, int8=True)

    def _call(
        self, x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype, int8: bool
    ) -> torch.Tensor:
        if x.dtype not in _DTYPES:
            x = x.float()
        if x.dim() == 2 and x.stride(-1) != 1:
            x = x.contiguous()
        _check(x, packed, out_dtype, int8)
        m, k = x.shape
        n = packed.shape[0] * BLOCK_OUTS
        y = torch.empty(m, n, dtype=out_dtype)
        if m == 0:
            return y
        threads = self.num_threads or torch.get_num_threads()
        args = _CALL_ARGS.pack(
            y.data_ptr(), n, x.data_ptr(), x.stride(0), packed.data_ptr(), m, n, k,
            int(out_dtype == torch.bfloat16), int(x.dtype == torch.bfloat16), threads, int(int8),
        )  # fmt: skip
        if self._matmul(args) != 0:
            raise MemoryError(f"int4 q8 kernel: no memory for the int8 activations of {m} x {k}")
        return y


def _check(x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype, int8: bool = False) -> None:
    if not x.is_cpu or x.dim() != 2:
        raise ValueError(f"int4 q8 kernel: x must be a 2-D CPU tensor, got {tuple(x.shape)} on {x.device}")
    if out_dtype not in _DTYPES:
        raise ValueError(f"int4 q8 kernel: output dtype {out_dtype} unsupported (fp32 or bf16)")
    k = x.shape[1]
    ok = packed.dtype == torch.uint8 and packed.is_cpu and packed.is_contiguous() and k % GROUP == 0
    record = INT8_RECORD_BYTES if int8 else RECORD_BYTES
    want = f"[N/{BLOCK_OUTS}, {k // GROUP}, {record}]"
    ok = ok and packed.dim() == 3 and tuple(packed.shape[1:]) == (k // GROUP, record)
    if not ok:
        raise ValueError(
            f"int4 q8 kernel: packed weights must be {want} uint8, contiguous, for x with "
            f"{k} inputs (a multiple of {GROUP}); got {tuple(packed.shape)} {packed.dtype}"
        )
    if x.shape[0] > 1 and x.stride(0) < k:
        raise ValueError("int4 q8 kernel: rows of x overlap")
