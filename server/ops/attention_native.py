"""The decode step's attention as one C call per op: ``attention_torch``'s functions, compiled.

``NativeAttention.rope_and_cache`` and ``.decode_attention`` have the signatures and meaning of
``attention_torch.rope_and_cache`` and ``.decode_attention`` (layouts documented there). Where
torch runs ~10 small ops for RoPE and the two cache writes and ~12 for attention (two gathers of
the padded KV rows, two batched products, casts, softmax), these run one C loop each that reads
the cache rows in place through the index and stops at each sequence's true length: no gather
copies, no padding read. Products and softmax in fp32, each output rounded once; fp32 RoPE
rounds exactly as torch's (compiled with -ffp-contract=off).

The C source (``attention_native.c``) is built on first use for this CPU and cached under
``<cache_dir>/kernels`` (``native_build``); ``load()`` returns None (one warning logged) where
that is not possible, and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path
from typing import NoReturn

import torch

from server.ops.native_build import BASE_CFLAGS, NativeSource, float_bits, load_library

SOURCE = NativeSource(
    "attention_native",
    Path(__file__).with_name("attention_native.c"),
    (*BASE_CFLAGS, "-ffp-contract=off", "-fopenmp"),
)
MAX_HEAD_DIM, MAX_GROUP = 256, 32  # as in the C file
_FLAGS = {torch.float32: 0, torch.bfloat16: 1}
_ROPE_ARGS = struct.Struct("=14q")  # RopeArgs of the C file, in order
_DECODE_ARGS = struct.Struct("=18q")  # DecodeArgs


def load(cache_dir: Path | str | None = None) -> NativeAttention | None:
    """The compiled kernels (built on first use, then cached on disk), or None where they cannot be."""
    lib = load_library(SOURCE, cache_dir)
    if lib is None:
        return None
    for fn in (lib.loraplex_rope_and_cache, lib.loraplex_decode_attention):
        fn.argtypes, fn.restype = (ctypes.c_char_p,), ctypes.c_int
    return NativeAttention(lib)


class NativeAttention:
    """The loaded kernels. Index tensors are bounds-checked once per tensor object: a step builds
    one ``write_index`` and one ``kv_index`` and every layer passes the same ones."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._rope = lib.loraplex_rope_and_cache
        self._decode = lib.loraplex_decode_attention
        self.num_threads: int | None = None  # decode attention's threads (default: torch's thread count)
        # what -> (tensor, rows it was checked against)
        self._checked: dict[str, tuple[torch.Tensor, int]] = {}

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_index: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:
        """``attention_torch.rope_and_cache``; q is rotated in place in ``qkv`` and returned as a view."""
        num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
        if not _rope_inputs_fit(qkv, cos, sin, k_cache, v_cache, num_heads, num_kv_heads):
            _explain_rope(qkv, cos, sin, k_cache, v_cache, num_heads, num_kv_heads)
        self._check_rows("write_index", write_index, (num_tokens,), k_cache.shape[1])
        args = _ROPE_ARGS.pack(
            qkv.data_ptr(), qkv.stride(0), num_tokens, num_heads, num_kv_heads, head_dim,
            cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
            write_index.data_ptr(), _FLAGS[qkv.dtype], _FLAGS[k_cache.dtype],
        )  # fmt: skip
        self._rope(args)
        return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_index: torch.Tensor,
        kv_lens: torch.Tensor,
        kv_bias: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``attention_torch.decode_attention`` (``kv_bias`` is not read: ``kv_lens`` bounds each row)."""
        num_seqs, num_heads, head_dim = q.shape
        if not _decode_inputs_fit(q, k_cache, v_cache, kv_index):
            _explain_decode(q, k_cache, v_cache, kv_index)
        self._check_rows("kv_index", kv_index, kv_index.shape, k_cache.shape[1])
        self._check_lens(kv_lens, num_seqs, kv_index.shape[1])
        out = torch.empty(q.shape, dtype=q.dtype)
        args = _DECODE_ARGS.pack(
            out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0),
            num_seqs, num_heads, k_cache.shape[0], head_dim,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
            kv_index.data_ptr(), kv_index.stride(0), kv_lens.data_ptr(),
            float_bits(scale), _FLAGS[q.dtype], _FLAGS[k_cache.dtype],
            self.num_threads or torch.get_num_threads(),
        )  # fmt: skip
        if self._decode(args) != 0:
            raise MemoryError("native attention kernel: out of memory for its scores scratch")
        return out

    def _check_rows(self, what: str, index: torch.Tensor, shape: tuple[int, ...], rows: int) -> None:
        """An int64 CPU index of ``shape`` whose every value is a row of the cache (once per tensor)."""
        last = self._checked.get(what)
        if last is not None and last[0] is index and last[1] == rows:
            return
        _require(
            index.dtype == torch.int64 and index.is_cpu and tuple(index.shape) == tuple(shape),
            f"{what} must be int64 {tuple(shape)} on CPU",
        )
        _require(index.stride(-1) == 1, f"{what} must have a unit innermost stride")
        if index.numel():
            _require(
                int(index.min()) >= 0 and int(index.max()) < rows,
                f"{what} points outside the {rows} cache rows",
            )
        self._checked[what] = (index, rows)

    def _check_lens(self, lens: torch.Tensor, num_seqs: int, max_len: int) -> None:
        last = self._checked.get("kv_lens")
        if last is not None and last[0] is lens and last[1] == max_len:
            return
        _require(
            lens.dtype == torch.int64 and lens.is_contiguous() and lens.shape == (num_seqs,),
            "kv_lens must be int64 [Bd]",
        )
        if num_seqs:
            _require(int(lens.min()) >= 1 and int(lens.max()) <= max_len, f"kv_lens must lie in 1..{max_len}")
        self._checked["kv_lens"] = (lens, max_len)


def _cache_fits(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> bool:
    return (
        k_cache.dim() == 3 and k_cache.shape == v_cache.shape and k_cache.shape[0] == num_kv_heads
        and 0 < head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0 and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in _FLAGS and k_cache.is_contiguous() and v_cache.is_contiguous()
        and k_cache.is_cpu and v_cache.is_cpu
    )  # fmt: skip


def _rope_inputs_fit(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> bool:
    """The fast check of every call (the bounds of write_index are checked apart)."""
    head_dim = k_cache.shape[-1]
    rows = (qkv.shape[0], head_dim)
    return (
        _cache_fits(k_cache, v_cache, num_kv_heads, head_dim)
        and qkv.dim() == 2 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
        and qkv.stride(1) == 1 and qkv.dtype in _FLAGS and qkv.is_cpu
        and cos.shape == rows and sin.shape == rows and cos.is_contiguous() and sin.is_contiguous()
        and cos.dtype == qkv.dtype and sin.dtype == qkv.dtype and cos.is_cpu and sin.is_cpu
    )  # fmt: skip


def _decode_inputs_fit(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor
) -> bool:
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[0]
    return (
        _cache_fits(k_cache, v_cache, num_kv_heads, head_dim) and num_kv_heads > 0
        and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP
        and q.stride(2) == 1 and q.stride(1) == head_dim and q.dtype in _FLAGS and q.is_cpu
        and kv_index.dim() == 2 and kv_index.shape[0] == q.shape[0] and kv_index.stride(1) == 1
    )  # fmt: skip


def _explain_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    _require(
        k_cache.shape == v_cache.shape and k_cache.dim() == 3,
        "k_cache and v_cache must be [H_kv, rows, D] alike",
    )
    _require(
        k_cache.shape[0] == num_kv_heads and 0 < head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0,
        "unsupported head shape",
    )
    _require(
        k_cache.dtype == v_cache.dtype and k_cache.dtype in _FLAGS,
        "cache dtypes must be float32 or bfloat16, one dtype",
    )
    _require(k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous")
    _require(k_cache.is_cpu and v_cache.is_cpu, "caches must be on the CPU")


def _explain_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> NoReturn:
    """Raise the ValueError that says what about these inputs the kernel does not support."""
    head_dim = k_cache.shape[-1]
    _explain_cache(k_cache, v_cache, num_kv_heads, head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _require(
        qkv.dim() == 2 and qkv.shape[1] == width and qkv.stride(1) == 1,
        f"qkv must be [T, {width}], unit column stride",
    )
    _require(qkv.dtype in _FLAGS, "dtypes must be float32 or bfloat16")
    _require(qkv.is_cpu, "all tensors must be on the CPU")
    for name, table in (("cos", cos), ("sin", sin)):
        _require(
            table.shape == (qkv.shape[0], head_dim) and table.is_contiguous(),
            f"{name} must be contiguous [T, D]",
        )
        _require(table.dtype == qkv.dtype and table.is_cpu, f"{name} must be a CPU tensor of qkv's dtype")
    raise AssertionError("unreachable: the fast check and the explanation disagree")


def _explain_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor
) -> NoReturn:
    num_kv_heads, head_dim = k_cache.shape[0], q.shape[-1]
    _explain_cache(k_cache, v_cache, num_kv_heads, head_dim)
    _require(
        num_kv_heads > 0 and q.shape[1] % num_kv_heads == 0 and q.shape[1] // num_kv_heads <= MAX_GROUP,
        "unsupported head grouping",
    )
    _require(q.stride(2) == 1 and q.stride(1) == head_dim, "q must be [Bd, H, D] with contiguous heads")
    _require(q.dtype in _FLAGS and q.is_cpu, "dtypes must be float32 or bfloat16 on CPU")
    _require(
        kv_index.dim() == 2 and kv_index.shape[0] == q.shape[0] and kv_index.stride(1) == 1,
        "kv_index must be [Bd, Lmax]",
    )
    raise AssertionError("unreachable: the fast check and the explanation disagree")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"native attention kernel: {message}")
