"""LoRA side path as one fused C call per projection module: the CPU kernel for decode-like steps.

``NativeLoRA.add_lora`` has the signature and meaning of ``lora_torch.add_lora`` (layouts and
semantics are documented there): for every token t of a LoRA segment (start, end, slot) and every
output slice n = (lo, hi), ``y[t, lo:hi] += (lora_a[slot, :, n] @ x[t]) @ lora_b[slot, :, lo:hi]``.
Where the torch path runs ~8 small ops per module (bmm shrink, permute, per-slice bmm expand,
adds), this runs one C loop that reads each used slot's rank-true A and B rows once per block of
up to 8 tokens, accumulates in fp32 and adds into y once (bf16 y: rounded once, to nearest even).
Base-only tokens (slot -1) are never read or written.

The C source (``lora_native.c``, next to this file) is compiled on first use for the machine it
runs on and cached under ``<cache_dir>/kernels`` (``native_build``). ``load()`` returns None (one
warning logged) where that is not possible; callers then keep the torch path.
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from pathlib import Path
from typing import NoReturn

import torch

from server.ops.lora_torch import LoRASegments, OutputSlices
from server.ops.native_build import BASE_CFLAGS, NativeSource, load_library

SOURCE = NativeSource("lora_native", Path(__file__).with_name("lora_native.c"), (*BASE_CFLAGS, "-fopenmp"))
# The C side's dtype bits: 1 = y is bf16, 2 = x is bf16, 4 = A and B are bf16 (else fp32)
_BITS = {torch.float32: 0, torch.bfloat16: 1}
DTYPE_CODES = {
    (yd, xd, wd, wd): yb | xb << 1 | wb << 2
    for yd, yb in _BITS.items()
    for xd, xb in _BITS.items()
    for wd, wb in _BITS.items()
}
MAX_CACHED_SLICES = 256  # distinct output_slices tuples remembered (a model has ~4)
# lora_native_add's CallArgs: y, y row stride, x, x row stride, A and its slot / rank / slice
# strides, B and its slot / rank strides, dtype bits, rank, slices, in features, the slices and
# segments arrays, G, threads. One packed buffer: ~0.7 µs through ctypes, 19 arguments ~2.7 µs.
_CALL_ARGS = struct.Struct("=19q")

Int64Array = ctypes.Array[ctypes.c_int64]
# The C arrays cached by ``NativeLoRA``, each kept alive by its entry:
_SegmentsEntry = tuple[Int64Array, int, int, int, int]  # (array, its address, G, tokens end, max slot)
_SlicesEntry = tuple[OutputSlices, Int64Array, int, int, int]  # (the tuple, array, its address, N, max hi)
_Shapes = tuple[torch.Size, torch.Size, torch.Size, torch.Size]  # y, x, lora_a, lora_b
_Strides = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
_Bounds = tuple[int, int, int, int]  # (num slices, max hi, tokens end, max slot)


def load(cache_dir: Path | str | None = None) -> NativeLoRA | None:
    """The compiled kernel (built on first use, then cached on disk), or None where it cannot be.

    None comes with one warning line saying why (see ``native_build``). Never raises for those.
    """
    lib = load_library(SOURCE, cache_dir)
    if lib is None:
        return None
    lib.lora_native_add.argtypes = (ctypes.c_char_p,)  # a packed CallArgs (immutable bytes)
    lib.lora_native_add.restype = ctypes.c_int
    return NativeLoRA(lib)


PARALLEL_MIN_TOKENS = 32  # calls over at least this many tokens (prefill) use ``prefill_threads``


class NativeLoRA:
    """The loaded kernel. Threads per call (the caller plus pthread workers): ``num_threads`` for
    decode-sized calls, ``prefill_threads`` (default: torch's thread count) from
    PARALLEL_MIN_TOKENS tokens on.

    The extra threads are torch's own OpenMP team (see ``run_parallel`` in the C file). One
    thread is the decode default: on a 2-core Zen 5 VM, 2 threads made a mixed decode step of
    SmolLM2-135M only ~3% faster (23.9 vs 24.6 ms, median of 8, within the noise), while the
    LoRA share of an 8-prompt prefill step (318 tokens, bf16 slots) fell from 95-150 ms with
    1 thread to 40-80 ms with 2. A private pthread pool gained nothing inside a real step: its
    workers waited for torch's spinning OpenMP workers to give up the core. Calls from several
    Python threads at once are safe.
    """

    def __init__(self, lib: ctypes.CDLL, num_threads: int = 1, prefill_threads: int | None = None) -> None:
        self._add = lib.lora_native_add
        self.num_threads = num_threads
        self.prefill_threads = prefill_threads
        # (last LoRASegments seen, its C array and bounds)
        self._segments: tuple[LoRASegments | None, _SegmentsEntry | None] = (None, None)
        self._slices: dict[int, _SlicesEntry] = {}  # id(output_slices) -> (the tuple, C array, max hi)

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        segments: LoRASegments,
        output_slices: OutputSlices,
    ) -> None:
        """``lora_torch.add_lora`` in one C call: y [T, out] += LoRA(x [T, in]) in place.

        lora_a [S, R, N, in] and lora_b [S, R, out_total] are (rank-true) views in fp32 or bf16,
        unit innermost stride, any outer strides; x and y fp32 or bf16 with unit column stride.
        ValueError for anything else (CUDA tensors, float16, mismatched shapes, slots or
        columns out of range) instead of reading out of bounds.
        """
        if not segments.has_lora:
            return
        segs_addr, num_segs, tokens_end, max_slot = self._segments_entry(segments)
        slices_addr, num_slices, max_hi = self._slices_entry(output_slices)
        code = DTYPE_CODES.get((y.dtype, x.dtype, lora_a.dtype, lora_b.dtype))
        shapes: _Shapes = y.shape, x.shape, lora_a.shape, lora_b.shape
        strides: _Strides = y.stride(), x.stride(), lora_a.stride(), lora_b.stride()
        bounds: _Bounds = num_slices, max_hi, tokens_end, max_slot
        on_cpu = y.is_cpu and x.is_cpu and lora_a.is_cpu and lora_b.is_cpu
        if code is None or not on_cpu or not _fits(shapes, strides, bounds):
            _refuse(y, x, lora_a, lora_b, bounds)
        a_shape, a_st, b_st = shapes[2], strides[2], strides[3]
        args = _CALL_ARGS.pack(
            *(y.data_ptr(), strides[0][0], x.data_ptr(), strides[1][0]),
            *(lora_a.data_ptr(), a_st[0], a_st[1], a_st[2], lora_b.data_ptr(), b_st[0], b_st[1]),
            *(
                code,
                a_shape[1],
                num_slices,
                a_shape[3],
                slices_addr,
                segs_addr,
                num_segs,
                self._threads(tokens_end),
            ),
        )
        if self._add(args) != 0:
            raise MemoryError("native LoRA kernel: out of memory for its scratch buffers")

    def _threads(self, num_tokens: int) -> int:
        if num_tokens < PARALLEL_MIN_TOKENS:
            return self.num_threads
        return self.prefill_threads or max(self.num_threads, torch.get_num_threads())

    def _segments_entry(self, segments: LoRASegments) -> tuple[int, int, int, int]:
        """(address of int64 [G][3] seg_bounds, G, last token + 1, highest slot); cached per step."""
        last, cached = self._segments
        if last is segments and cached is not None:  # cached is None only while last is
            return cached[1:]
        bounds = segments.seg_bounds
        if any(start < 0 or end < start or slot < 0 for start, end, slot in bounds):
            raise ValueError(f"malformed segments {bounds}")
        array = (ctypes.c_int64 * (3 * len(bounds)))(*(v for bound in bounds for v in bound))
        ends, slots = (end for _, end, _ in bounds), (slot for _, _, slot in bounds)
        entry: _SegmentsEntry = (array, ctypes.addressof(array), len(bounds), max(ends), max(slots))
        self._segments = (segments, entry)
        return entry[1:]

    def _slices_entry(self, output_slices: OutputSlices) -> tuple[int, int, int]:
        """(address of int64 [N][2] slices, N, largest hi); cached per tuple object.

        Slices must not overlap: the C side accumulates all slices of a token in one column buffer.
        """
        cached = self._slices.get(id(output_slices))
        if cached is not None and cached[0] is output_slices:
            return cached[2:]
        ordered = sorted(output_slices)
        overlap = any(hi > next_lo for (_, hi), (next_lo, _) in itertools.pairwise(ordered))
        if not output_slices or overlap or any(not 0 <= lo <= hi for lo, hi in output_slices):
            raise ValueError(f"malformed output slices {output_slices} (each 0 <= lo <= hi, none overlap)")
        if len(self._slices) >= MAX_CACHED_SLICES:
            self._slices.clear()
        array = (ctypes.c_int64 * (2 * len(output_slices)))(*(v for pair in output_slices for v in pair))
        max_hi = max(hi for _, hi in output_slices)
        entry: _SlicesEntry = (output_slices, array, ctypes.addressof(array), len(output_slices), max_hi)
        self._slices[id(output_slices)] = entry
        return entry[2:]


def _fits(shapes: _Shapes, strides: _Strides, bounds: _Bounds) -> bool:
    """Whether the layouts are ones the C side reads and writes within bounds (the fast check)."""
    (y_shape, x_shape, a_shape, b_shape), (y_st, x_st, a_st, b_st) = shapes, strides
    num_slices, max_hi, tokens_end, max_slot = bounds
    return (
        (len(y_shape), len(x_shape), len(a_shape), len(b_shape)) == (2, 2, 4, 3)
        and (y_st[1], x_st[1], a_st[3], b_st[2]) == (1, 1, 1, 1)
        and (y_st[0] >= y_shape[1] or y_shape[0] <= 1)
        and a_shape[2] == num_slices
        and a_shape[3] == x_shape[1]
        and (b_shape[0], b_shape[1]) == (a_shape[0], a_shape[1])
        and max_hi <= b_shape[2]
        and max_hi <= y_shape[1]
        and tokens_end <= x_shape[0]
        and tokens_end <= y_shape[0]
        and max_slot < a_shape[0]
    )


def _refuse(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bounds: _Bounds
) -> NoReturn:
    """Raise the ValueError that says what about these inputs the kernel does not support."""
    if not (y.is_cpu and x.is_cpu and lora_a.is_cpu and lora_b.is_cpu):
        raise ValueError("native LoRA kernel: all tensors must be on the CPU")
    if (y.dtype, x.dtype, lora_a.dtype, lora_b.dtype) not in DTYPE_CODES:
        raise ValueError(
            f"native LoRA kernel: dtypes y={y.dtype} x={x.dtype} A={lora_a.dtype} B={lora_b.dtype} "
            "unsupported (fp32 or bf16; A and B alike)"
        )
    if (y.dim(), x.dim(), lora_a.dim(), lora_b.dim()) != (2, 2, 4, 3):
        raise ValueError("native LoRA kernel: expected y [T, out], x [T, in], A [S, R, N, in], B [S, R, out]")
    if (y.stride(1), x.stride(1), lora_a.stride(3), lora_b.stride(2)) != (1, 1, 1, 1):
        raise ValueError("native LoRA kernel: innermost dims of y, x, A and B must be contiguous")
    if y.shape[0] > 1 and y.stride(0) < y.shape[1]:
        raise ValueError("native LoRA kernel: rows of y overlap")
    num_slices, max_hi, tokens_end, max_slot = bounds
    num_slots, rank, n, in_features = lora_a.shape
    if n != num_slices or lora_b.shape[:2] != (num_slots, rank) or x.shape[1] != in_features:
        raise ValueError(
            f"native LoRA kernel: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}, x {tuple(x.shape)} "
            f"and {num_slices} slices disagree"
        )
    if max_hi > lora_b.shape[2] or max_hi > y.shape[1]:
        raise ValueError(f"native LoRA kernel: slices reach column {max_hi}, beyond B or y")
    raise ValueError(
        f"native LoRA kernel: segments reach token {tokens_end - 1} and slot {max_slot}, beyond "
        f"x {tuple(x.shape)}, y {tuple(y.shape)} or the {num_slots} slots"
    )
