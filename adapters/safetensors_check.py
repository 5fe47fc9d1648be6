"""Check a safetensors file's header and byte layout ourselves, before any library parses it.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data section. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets are
relative to the data section) plus an optional ``"__metadata__"`` map of strings to strings.

``read_header`` applies our limits first (file size, header length, tensor count), then checks
every entry and that the tensors tile the data section exactly: each span equals
``prod(shape) × dtype size``, spans start at 0, neither overlap nor leave gaps, and the last one
ends exactly at the end of the file. Only a file that passes is worth handing to ``safetensors``;
``load_checked`` does both.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_NDIM = 8
_LENGTH_BYTES = 8
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsFormatError(ValueError):
    """The file is not a safetensors file we accept; the message names the problem."""


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry; ``start``/``end`` are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(
    path: Path, *, max_file_bytes: int, max_header_bytes: int, max_num_tensors: int
) -> dict[str, TensorEntry]:
    """Validate ``path``'s size, header and data layout; return name → entry (``__metadata__`` dropped).

    Raises SafetensorsFormatError before reading more than ``max_header_bytes`` + 8 bytes. Only
    F32/F16/BF16 tensors of at most MAX_NDIM dimensions are accepted.
    """
    with open(path, "rb") as file:
        file_bytes = os.fstat(file.fileno()).st_size
        if file_bytes > max_file_bytes:
            raise SafetensorsFormatError(f"file is {file_bytes} bytes, over the limit of {max_file_bytes}")
        if file_bytes < _LENGTH_BYTES:
            raise SafetensorsFormatError(f"file is {file_bytes} bytes, too short for a safetensors header")
        header_bytes = int.from_bytes(file.read(_LENGTH_BYTES), "little")
        if header_bytes > max_header_bytes:
            raise SafetensorsFormatError(
                f"header length {header_bytes} is over the limit of {max_header_bytes} bytes"
            )
        if _LENGTH_BYTES + header_bytes > file_bytes:
            raise SafetensorsFormatError(
                f"header length {header_bytes} runs past the end of the file ({file_bytes} bytes)"
            )
        raw = file.read(header_bytes)
    header = _parse_json(raw)
    entries = _parse_entries(header, max_num_tensors)
    _check_layout(entries, file_bytes - _LENGTH_BYTES - header_bytes)
    return entries


def _parse_json(raw: bytes) -> dict[str, object]:
    """The header as a JSON object; duplicate keys, NaN/Infinity and deep nesting are refused."""

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise SafetensorsFormatError("header has a duplicate key")
        return dict(pairs)

    def no_constant(name: str) -> None:
        raise SafetensorsFormatError(f"header is not valid JSON: {name} is not a number")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, SafetensorsFormatError):
            raise
        raise SafetensorsFormatError(f"header is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _parse_entries(header: dict[str, object], max_num_tensors: int) -> dict[str, TensorEntry]:
    """Check ``__metadata__`` and the tensor count, then every tensor entry."""
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    if len(header) > max_num_tensors:
        raise SafetensorsFormatError(
            f"header lists {len(header)} tensors, over the limit of {max_num_tensors}"
        )
    return {name: _parse_entry(name, entry) for name, entry in header.items()}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object) -> TensorEntry:
    """One entry: known dtype, a shape of non-negative ints, offsets whose span fits the shape."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise SafetensorsFormatError(
            f"tensor {_short(name)}: entry must have exactly {sorted(_ENTRY_FIELDS)}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        allowed = ", ".join(DTYPE_BYTES)
        raise SafetensorsFormatError(
            f"tensor {_short(name)} has dtype {_short(dtype)}; only {allowed} are accepted"
        )
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_count(d) for d in shape):
        raise SafetensorsFormatError(
            f"tensor {_short(name)}: shape must be a list of at most {MAX_NDIM} non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise SafetensorsFormatError(f"tensor {_short(name)}: data_offsets must be two non-negative integers")
    start, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end < start or end - start != expected:
        raise SafetensorsFormatError(
            f"tensor {_short(name)}: shape {_short(shape)} of {dtype} needs {expected} bytes "
            f"but data_offsets {offsets} span {end - start}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _check_layout(entries: dict[str, TensorEntry], data_bytes: int) -> None:
    """The spans must tile ``[0, data_bytes)``: no overlap, no gap, nothing past the end."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.end > data_bytes:
            raise SafetensorsFormatError(
                f"tensor {_short(name)} data_offsets [{entry.start}, {entry.end}] run beyond the end of the "
                f"data ({data_bytes} bytes): the file is truncated or the offsets are wrong"
            )
        if entry.start < position:
            raise SafetensorsFormatError(
                f"tensors {_short(previous)} and {_short(name)} overlap in the data section"
            )
        if entry.start > position:
            raise SafetensorsFormatError(f"data bytes [{position}, {entry.start}) belong to no tensor")
        position, previous = entry.end, name
    if position != data_bytes:
        raise SafetensorsFormatError(
            f"data bytes [{position}, {data_bytes}) belong to no tensor (trailing bytes after the last one)"
        )


def load_checked(
    path: Path, *, max_file_bytes: int, max_header_bytes: int, max_num_tensors: int
) -> dict[str, torch.Tensor]:
    """``read_header`` with these limits, then safetensors loads the tensors; raises SafetensorsFormatError.

    The loaded tensors must match the checked header, so a file swapped between the check and the
    load is refused rather than trusted.
    """
    entries = read_header(
        path,
        max_file_bytes=max_file_bytes,
        max_header_bytes=max_header_bytes,
        max_num_tensors=max_num_tensors,
    )
    try:
        named = _read_tensors(path)
    except Exception as exc:  # safetensors raises several error types for malformed files
        raise SafetensorsFormatError(f"not a valid safetensors file: {exc}") from exc
    same = named.keys() == entries.keys() and all(
        named[k].dtype == _TORCH_DTYPES[e.dtype] and tuple(named[k].shape) == e.shape
        for k, e in entries.items()
    )
    if not same:
        raise SafetensorsFormatError("the file changed while it was being read")
    return named


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in memory of their own, never memory-mapped.

    safetensors' default (mmap) loader keeps about 56 bytes per tensor for good, every load
    (safetensors 0.8.0; their issue #369): a cache that re-reads thousands of small adapters grows
    without bound. Its ``pread`` backend (safetensors >= 0.8) and ``load(bytes)`` do not.
    """
    if _HAS_PREAD:
        return load_file(str(path), backend="pread")
    return load(path.read_bytes())  # an older safetensors without backends


_HAS_PREAD = "backend" in inspect.signature(load_file).parameters
