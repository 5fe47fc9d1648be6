"""CPU kernel choices made by measurement when the server starts, cached per CPU model.

The CPUs this runs on disagree on what is fastest (an AMD EPYC Zen 3 runs bf16 GEMMs about 2x
slower than fp32, a Zen 5 or an Intel Xeon with AVX512-BF16/AMX about 3x faster; ``W·xᵀ`` beats
``x·Wᵀ`` for decode-sized batches on one and loses on another), so nothing here is hard-coded
from one machine. For the model's own GEMM shapes at a decode-sized batch we time:

- the compute dtype (float32, bfloat16) when the user did not fix one with ``--dtype``;
- the base GEMM kernel in that dtype: ``x·Wᵀ`` or ``(W·xᵀ)ᵀ`` (MKL / oneDNN on plain weights), or
  oneDNN on weights reordered once into its blocked layout (``onednn``: 1.7x faster in bf16 and
  2.5x in fp32 at batch 8 on a Zen 5; bit-identical to plain in bf16, not in fp32);
- the decode-step LoRA side path: torch's batched products or the compiled kernel of
  ``server/ops/lora_native.c`` (one call per module instead of ~8 ops), with the slots in fp32 or
  in the base dtype (bf16 batched products in torch are 2x slower than fp32 on a Zen 5);
- the decode step's RoPE + KV-cache write + attention: torch ops or the compiled kernels of
  ``server/ops/attention_native.c`` (one call each, reading the paged cache in place);
- the number of torch threads (all cores, or one fewer, which leaves a core to the HTTP side).

The sample weights are random, of the model's real shapes, and large enough (> 2x a typical L3)
that the timing is memory-bound like a real decode step. The result is stored as JSON under
``<cache_dir>/tuning/`` keyed by the CPU model, its ISA flags, torch's version, the shapes and the
core count, and reused on later starts; ``describe()`` is the one line the server logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import torch
import torch.nn.functional as F

from server.model.quant.int_weights import Int4Weight, quantize_int4
from server.ops.cpu_info import cpu_identity, cpu_snapshot, cpuinfo, other_load
from server.ops.int4_native import Int4Kernel

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from server.ops.attention_torch import AttentionOps
    from server.ops.lora_torch import AddLoRA, OutputSlices

log = logging.getLogger(__name__)

TUNING_FORMAT = 4  # bump when what is measured changes, so old cached choices are not reused
DECODE_ROWS = 8  # the batch the choices are measured at (decode steps are this size or near it)
SAMPLE_BYTES = 96 << 20  # weights touched per timed pass: beyond L3, so memory-bound as in decode
TIMED_PASSES = 5
# A measurement taken while other processes kept more cores busy than this is not cached: a
# concurrent test run once made a noisy start pick x·Wᵀ over oneDNN for good (20 % slower serving).
MAX_OTHER_LOAD = 0.3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CANDIDATE_DTYPES = ("float32", "bfloat16")  # what --dtype unset chooses between
Measured = TypeVar("Measured")  # a JSON value: what ``remembered`` caches
GEMM_KERNELS = {"x_wt": "x·Wᵀ", "w_xt": "W·xᵀ", "onednn": "oneDNN-packed"}  # kernel: label in timings


@dataclass(frozen=True)
class GemmShapes:
    """The weight shapes [out, in] of one decoder layer's base GEMMs, plus the LM head and LoRA."""

    layer: tuple[tuple[int, int], ...]  # fused q|k|v, o, gate|up, down
    lm_head: tuple[int, int]
    num_layers: int
    slices: tuple[tuple[int, ...], ...] = ()  # output slice widths of each module of ``layer``
    heads: tuple[int, int, int] = (0, 0, 0)  # attention: query heads, kv heads, head size (0: unknown)

    @classmethod
    def of(cls, config: PretrainedConfig) -> GemmShapes:
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        layer = ((q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter))
        slices = ((q, kv, kv), (hidden,), (inter, inter), (hidden,))
        heads = (config.num_attention_heads, config.num_key_value_heads, head_dim)
        return cls(layer, (config.vocab_size, hidden), config.num_hidden_layers, slices, heads)


@dataclass(frozen=True)
class CpuKernelChoice:
    """What the CPU step uses. ``timings_ms``: one decode pass of the sampled GEMMs per candidate."""

    dtype: str  # compute dtype of the base model (the user's --dtype when given)
    gemm: str  # base GEMM kernel: one of GEMM_KERNELS
    lora_dtype: str  # dtype of the LoRA slot buffers and the side-path products
    lora_kernel: str  # decode-step side path: "torch" (batched products) or "native" (lora_native.c)
    num_threads: int
    cpu: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # or "cached"
    seconds: float = 0.0  # how long measuring took
    attention_kernel: str = "torch"  # decode-step RoPE, KV write and attention: "torch" or "native"
    lora_threads: int = 1  # threads of a decode-step call of the native LoRA kernel
    other_load: float = 0.0  # cores other processes kept busy while it was measured

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_lora_dtype(self) -> torch.dtype:
        return DTYPES[self.lora_dtype]

    def describe(self) -> str:
        layout = GEMM_KERNELS[self.gemm]
        timings = ", ".join(f"{k} {v:.1f}" for k, v in self.timings_ms.items())
        how = f"measured in {self.seconds:.1f} s" if self.source == "measured" else "cached"
        if self.other_load > MAX_OTHER_LOAD:
            how += f" while other processes kept {self.other_load:.1f} cores busy: not cached"
        lora_threads = f" on {self.lora_threads} threads" if self.lora_threads > 1 else ""
        return (
            f"cpu tuning: {self.cpu} -> {self.dtype} base, {layout} GEMMs, LoRA {self.lora_kernel} in "
            f"{self.lora_dtype}{lora_threads}, attention {self.attention_kernel}, "
            f"{self.num_threads} threads ({how}; ms per decode pass: {timings})"
        )


def choose(shapes: GemmShapes, dtype: str | None, cache_dir: Path) -> CpuKernelChoice:
    """The cached choice for this CPU and these shapes, else a fresh measurement (then cached)."""
    cores = os.cpu_count() or 1
    key = _cache_key(shapes, dtype, cores)
    path = cache_dir / "tuning" / f"cpu-{key}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached
    since = cpu_snapshot()
    choice = dataclasses.replace(
        measure(shapes, dtype, cores, cache_dir), other_load=round(other_load(since), 2)
    )
    if choice.other_load > MAX_OTHER_LOAD:
        message = "the CPU tuning ran while other processes kept %.1f cores busy: its choice serves now"
        log.warning(message + " but is not cached (the next start measures again)", choice.other_load)
    else:
        _write_cached(path, choice)
    return choice


def remembered(
    name: str, shapes: GemmShapes, context: str, cache_dir: Path, measure: Callable[[], Measured]
) -> Measured:
    """``measure()``'s JSON value, cached like ``choose``'s under ``<cache_dir>/tuning/<name>-<key>.json``
    (the key: this CPU, torch, ``shapes``, the core count and ``context``, e.g. the chosen dtype).

    A later start reuses it, so a choice made by a close timing (int4 15.6 ms against dense 15.7 ms
    on one Xeon) does not flip between restarts and change what the server computes. A measurement
    taken while other processes kept more than MAX_OTHER_LOAD cores busy serves but is not cached.
    """
    path = cache_dir / "tuning" / f"{name}-{_cache_key(shapes, context, os.cpu_count() or 1)}.json"
    try:
        return cast("Measured", json.loads(path.read_text())["value"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure
    since = cpu_snapshot()
    value = measure()
    if other_load(since) <= MAX_OTHER_LOAD:
        _write_json(path, {"value": value}, f"the {name} measurement")
    return value


def _cache_key(shapes: GemmShapes, dtype: str | None, cores: int) -> str:
    text = "|".join([cpu_identity(), cpuinfo().get("flags", ""), torch.__version__, repr(shapes),
                     str(dtype), str(cores), str(TUNING_FORMAT)])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cached(path: Path) -> CpuKernelChoice | None:
    try:
        data = json.loads(path.read_text())
        return CpuKernelChoice(**{**data, "source": "cached"})
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: measure again


def _write_cached(path: Path, choice: CpuKernelChoice) -> None:
    _write_json(path, asdict(choice), "the CPU tuning")


def _write_json(path: Path, data: object, what: str) -> None:
    """``data`` as JSON at ``path``, replaced atomically; a warning (not an error) where it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache dir only costs a measurement per start
        log.warning("could not cache %s in %s: %s", what, path, exc)


def measure(
    shapes: GemmShapes, dtype: str | None, cores: int, cache_dir: Path | None = None
) -> CpuKernelChoice:
    """Time the candidates on random weights of the model's shapes; pick the fastest of each.

    Candidates run interleaved, one pass each per round, so a burst of load from another process
    lands on all of them instead of deciding the choice.
    """
    started = time.perf_counter()
    names = [dtype] if dtype is not None else list(CANDIDATE_DTYPES)
    with torch.inference_mode():
        weights = {name: _sample_weights(shapes, DTYPES[name]) for name in names}
        gemms = {
            f"{name} {label}": run
            for name in names
            for kernel, label in GEMM_KERNELS.items()
            if (run := _gemm_pass(weights[name], kernel)) is not None
        }
        scale = shapes.num_layers / _sample_layers(shapes)  # report ms for the whole model's layers
        timings = {name: ms * scale for name, ms in _time_interleaved(gemms).items()}
        best = min(timings, key=timings.__getitem__)
        best_dtype, best_label = best.split(" ", 1)
        best_gemm = next(kernel for kernel, label in GEMM_KERNELS.items() if label == best_label)
        best_pass = gemms[best]
        del weights, gemms  # only the winner's sample stays alive, for the thread count
        lora_kernel, lora_dtype, lora_threads = _pick_lora(shapes, best_dtype, cache_dir, timings)
        attention_kernel = _pick_attention(shapes, DTYPES[best_dtype], cache_dir, timings)
        threads = _pick_threads(best_pass, cores, timings, scale)
    return CpuKernelChoice(
        dtype=best_dtype, gemm=best_gemm, lora_dtype=lora_dtype, lora_kernel=lora_kernel, num_threads=threads,
        cpu=cpu_identity(), timings_ms=timings, seconds=time.perf_counter() - started,
        attention_kernel=attention_kernel, lora_threads=lora_threads,
    )  # fmt: skip


def _sample_layers(shapes: GemmShapes) -> int:
    """Layers to sample: enough for SAMPLE_BYTES in fp32 (at most all), the same for every dtype."""
    layer_bytes = sum(o * i for o, i in shapes.layer) * 4
    return max(1, min(shapes.num_layers, -(-SAMPLE_BYTES // layer_bytes)))


def _sample_weights(shapes: GemmShapes, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random layer weights of the real shapes, ``_sample_layers`` layers of them."""
    return [torch.randn(shape, dtype=dtype) for _ in range(_sample_layers(shapes)) for shape in shapes.layer]


def _gemm_pass(
    weights: list[torch.Tensor], kernel: str, rows: int = DECODE_ROWS
) -> Callable[[], None] | None:
    """One pass of decode-sized GEMMs over ``weights`` with one kernel (None: not available here)."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    try:
        prepared = [prepare_weight(w, kernel) for w in weights]
    except RuntimeError:  # a torch built without oneDNN, or a dtype it does not pack
        return None

    def one_pass() -> None:
        for weight in prepared:
            base_gemm(inputs[weight.shape[1]], weight, None, kernel == "w_xt")

    return one_pass


def _pick_lora(
    shapes: GemmShapes, base_dtype: str, cache_dir: Path | None, timings: dict[str, float]
) -> tuple[str, str, int]:
    """(kernel, slot dtype, threads) of the fastest decode-step side path: 8 slots at rank 16.

    Candidates: torch's batched products and the compiled kernel (where it builds here), each with
    fp32 slots and, under a bf16 base, bf16 slots; the compiled kernel on one thread and on all of
    torch's (its OpenMP team is torch's, so a pass alone sees the same team a real step does).
    """
    from server.ops import lora_native, lora_torch

    threads = torch.get_num_threads()
    kernels = {"LoRA torch": ("torch", 1, lora_torch.add_lora)}
    for count in dict.fromkeys((1, threads)):
        native = lora_native.load(cache_dir)
        if native is not None:
            native.num_threads = count
            label = "LoRA native" + (f" {count} threads" if count > 1 else "")
            kernels[label] = ("native", count, native.add_lora)
    candidates = {
        f"{label} {name}": (kernel, name, count, _lora_pass(shapes, op, DTYPES[name], DTYPES[base_dtype]))
        for name in dict.fromkeys(("float32", base_dtype))
        for label, (kernel, count, op) in kernels.items()
    }
    lora_times = _time_interleaved({label: c[3] for label, c in candidates.items()})
    timings.update(lora_times)
    kernel, name, count, _ = candidates[min(lora_times, key=lora_times.__getitem__)]
    return kernel, name, count


def _lora_pass(
    shapes: GemmShapes,
    add_lora: AddLoRA,
    slot_dtype: torch.dtype,
    base_dtype: torch.dtype,
    slots: int = 8,
    rank: int = 16,
) -> Callable[[], None]:
    """One decode step's side path through ``add_lora``: 8 tokens on 8 slots, over every layer."""
    from server.ops.lora_torch import LoRASegments

    segments = LoRASegments.build(list(range(slots)), torch.device("cpu"), [rank] * slots)
    # per module: y [S, out], x [S, in], A [S, R, N, in], B [S, R, out], output slices
    modules: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, OutputSlices]] = []
    for _ in range(shapes.num_layers):
        for (out, inp), widths in zip(shapes.layer, shapes.slices, strict=True):
            bounds = tuple((sum(widths[:n]), sum(widths[: n + 1])) for n in range(len(widths)))
            a = torch.randn(slots, rank, len(widths), inp, dtype=slot_dtype)  # [S, R, N, in]
            b = torch.randn(slots, rank, out, dtype=slot_dtype)  # [S, R, out]
            x, y = torch.randn(slots, inp, dtype=base_dtype), torch.zeros(slots, out, dtype=base_dtype)
            modules.append((y, x, a, b, bounds))

    def one_pass() -> None:
        for y, x, a, b, bounds in modules:
            add_lora(y, x, a, b, segments, bounds)

    return one_pass


def _pick_attention(
    shapes: GemmShapes, dtype: torch.dtype, cache_dir: Path | None, timings: dict[str, float]
) -> str:
    """The faster decode-step attention: ``attention_torch`` or the compiled ``attention_native``
    (where it builds here), timed over every layer at 8 sequences of 64-128 cached tokens."""
    from server.ops import attention_native, attention_torch

    if 0 in shapes.heads:
        return "torch"
    native = attention_native.load(cache_dir)
    kernels = {"torch": attention_torch} | ({"native": native} if native else {})
    passes = {f"attention {name}": _attention_pass(shapes, ops, dtype) for name, ops in kernels.items()}
    attention_times = _time_interleaved(passes)
    timings.update(attention_times)
    return min(attention_times, key=attention_times.__getitem__).split()[1]


def _attention_pass(
    shapes: GemmShapes, ops: AttentionOps, dtype: torch.dtype, seqs: int = DECODE_ROWS, block: int = 16
) -> Callable[[], None]:
    """One decode step's RoPE + KV write + attention through ``ops``, over every layer."""
    num_heads, num_kv_heads, head_dim = shapes.heads
    lens = torch.tensor([64 + (37 * i) % 64 for i in range(seqs)])  # [Bd] 64..127 tokens
    max_len = -(-int(lens.max()) // block) * block
    index = torch.arange(seqs)[:, None] * max_len + torch.arange(max_len)[None, :]  # [Bd, Lmax], contiguous
    bias = torch.zeros(seqs, 1, 1, max_len).masked_fill_(
        (torch.arange(max_len) >= lens[:, None])[:, None, None], float("-inf")
    )
    write = index.gather(1, (lens - 1)[:, None]).view(-1)  # each sequence's newest row
    cos = torch.randn(seqs, head_dim, dtype=dtype)
    sin = torch.randn(seqs, head_dim, dtype=dtype)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    cache_shape = (num_kv_heads, seqs * max_len, head_dim)
    layers = [
        (
            torch.randn(seqs, width, dtype=dtype),
            torch.randn(cache_shape, dtype=dtype),
            torch.randn(cache_shape, dtype=dtype),
        )
        for _ in range(shapes.num_layers)
    ]
    scale = head_dim**-0.5

    def one_pass() -> None:
        for qkv, k_cache, v_cache in layers:
            q = ops.rope_and_cache(qkv, cos, sin, write, k_cache, v_cache, num_heads, num_kv_heads)
            ops.decode_attention(q, k_cache, v_cache, index, lens, bias, scale)

    return one_pass


def _time_interleaved(passes: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median ms of each pass over TIMED_PASSES rounds that run every pass once (after a warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    for round_index in range(TIMED_PASSES + 1):
        for name, one_pass in passes.items():
            start = time.perf_counter()
            one_pass()
            if round_index:  # round 0 warms up: page faults, thread pool, kernel selection
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _pick_threads(best_pass: Callable[[], None], cores: int, timings: dict[str, float], scale: float) -> int:
    """All cores unless one fewer is as fast (within 3 %), which leaves a core to the HTTP side."""
    if cores < 2:
        return 1
    previous = torch.get_num_threads()

    def with_fewer_threads() -> None:
        torch.set_num_threads(cores - 1)
        try:
            best_pass()
        finally:
            torch.set_num_threads(previous)

    both = _time_interleaved({f"{previous} threads": best_pass, f"{cores - 1} threads": with_fewer_threads})
    both = {name: ms * scale for name, ms in both.items()}
    timings.update(both)
    fewer, now = both[f"{cores - 1} threads"], both[f"{previous} threads"]
    return cores - 1 if fewer <= now * 1.03 else previous


def prepare_weight(weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """``weight`` [out, in] as ``kernel`` reads it: reordered once for ``onednn``, else as it is."""
    if kernel == "onednn":
        reordered: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS)
        return reordered
    return weight


def base_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w_xt: bool) -> torch.Tensor:
    """x [T, in] · weight [out, in]ᵀ (+ bias) → [T, out], contiguous.

    ``weight`` is plain or reordered by ``prepare_weight(..., "onednn")`` (a mkldnn tensor);
    ``w_xt`` computes a plain weight's product as (W·xᵀ)ᵀ.
    """
    if weight.is_mkldnn:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return y
    if w_xt:
        y = torch.mm(weight, x.T).T.contiguous()
        return y if bias is None else y.add_(bias)
    return F.linear(x, weight, bias)


INT4_TORCH = "int4 bfloat16 activations"  # torch's int4 kernel in the timings; native ones: "int4 <name>"


def int4_native_label(kernel: Int4Kernel) -> str:
    return f"int4 {kernel.name}"


def time_int4_against_dense(
    shapes: GemmShapes, dtype: str, gemm: str | None, natives: Sequence[Int4Kernel] = ()
) -> dict[str, float]:
    """ms per decode pass of the model's layer GEMMs: dense (``dtype``, ``gemm``: the measured
    choice; None: no dense pass), int4 on torch's kernel with bf16 activations (key INT4_TORCH) and on each of
    ``natives`` (keys ``int4_native_label``), timed interleaved on the same sampled layers."""
    with torch.inference_mode():
        dense = _sample_weights(shapes, DTYPES[dtype])
        codes = [quantize_int4(w) for w in dense]
        inputs = {w.shape[1]: torch.randn(DECODE_ROWS, w.shape[1], dtype=DTYPES[dtype]) for w in dense}
        passes = {INT4_TORCH: _int4_pass([Int4Weight(c, torch.bfloat16) for c in codes], inputs)}
        for kernel in natives:
            kernel.min_rows = 1
            passes[int4_native_label(kernel)] = _int4_pass(
                [Int4Weight(c, torch.bfloat16, kernel) for c in codes], inputs
            )
        if gemm is not None and (dense_pass := _gemm_pass(dense, gemm)) is not None:
            passes[f"{dtype} {GEMM_KERNELS[gemm]}"] = dense_pass
        scale = shapes.num_layers / _sample_layers(shapes)
        return {name: ms * scale for name, ms in _time_interleaved(passes).items()}


def _int4_pass(weights: list[Int4Weight], inputs: dict[int, torch.Tensor]) -> Callable[[], None]:
    def one_pass() -> None:
        for weight in weights:
            weight.matmul(inputs[weight.in_features])

    return one_pass


LM_HEAD_PROBE_ROWS = (1, 2, 4, 8)


def lm_head_int8_max_rows(
    int8: Callable[[torch.Tensor], object], dense: Callable[[torch.Tensor], object], hidden: int, dtype: str
) -> dict[str, float | int | None]:
    """The most tokens up to which the int8 LM head beats the dense one at every probed size
    (None: not even at one), with the ms of both at 1 and at DECODE_ROWS tokens."""
    heads = {"int8": int8, "dense": dense}
    timings = {rows: time_lm_head(heads, hidden, dtype, rows) for rows in LM_HEAD_PROBE_ROWS}
    max_rows = None
    for rows in LM_HEAD_PROBE_ROWS:
        if timings[rows]["int8"] >= timings[rows]["dense"]:
            break
        max_rows = rows
    one, decode = timings[1], timings[DECODE_ROWS]
    return {"max_rows": max_rows, "int8_1": one["int8"], "dense_1": one["dense"],
            "int8_8": decode["int8"], "dense_8": decode["dense"]}  # fmt: skip


def time_lm_head(
    heads: dict[str, Callable[[torch.Tensor], object]], hidden: int, dtype: str, rows: int = DECODE_ROWS
) -> dict[str, float]:
    """ms per call of each LM head (name → ``head(x)``) on ``rows`` tokens, interleaved."""
    x = torch.randn(rows, hidden, dtype=DTYPES[dtype])

    def call(head: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def one_call() -> None:
            head(x)

        return one_call

    with torch.inference_mode():
        return _time_interleaved({name: call(head) for name, head in heads.items()})


INT4_NATIVE_PROBE_ROWS = (1, 2, 3, 4, 6, 8)


def int4_native_min_rows(shapes: GemmShapes, kernel: Int4Kernel, dtype: str = "bfloat16") -> int | None:
    """The fewest tokens (activations in ``dtype``) from which ``kernel`` beats torch's int4 kernel
    on one layer of the model's shapes; None: never up to 8."""
    with torch.inference_mode():
        weights = [
            Int4Weight(quantize_int4(torch.randn(shape) * 0.02), torch.bfloat16, kernel)
            for shape in shapes.layer
        ]
        for rows in INT4_NATIVE_PROBE_ROWS:
            timings = _time_interleaved(_native_paths(weights, kernel, rows, DTYPES[dtype]))
            if timings["native"] < timings["torch"]:
                return rows
    return None


def _native_paths(
    weights: list[Int4Weight], kernel: Int4Kernel, rows: int, dtype: torch.dtype
) -> dict[str, Callable[[], None]]:
    """One call per weight on ``rows`` tokens: through torch's int4 kernel, and on ``kernel``."""
    inputs = {w.in_features: torch.randn(rows, w.in_features, dtype=dtype) for w in weights}

    def run(min_rows: int) -> None:
        kernel.min_rows = min_rows
        for w in weights:
            w.matmul(inputs[w.in_features])

    return {"torch": lambda: run(rows + 1), "native": lambda: run(rows)}


INT4_DEQUANTIZE_PROBE_ROWS = (16, 32, 64, 128, 256, 512)


def int4_dequantize_min_rows(
    shapes: GemmShapes, native: Int4Kernel | None = None, dtype: str = "bfloat16"
) -> int | None:
    """The fewest tokens (activations in ``dtype``) from which unpacking a layer's int4 weights into
    dense ones in that dtype for the call beats the int4 kernel that serves that size (torch's, or
    ``native`` from its ``min_rows``), on one layer of the model's shapes; None when the kernel wins
    at every probed size."""
    with torch.inference_mode():
        weights = [
            Int4Weight(quantize_int4(torch.randn(shape) * 0.02), torch.bfloat16, native)
            for shape in shapes.layer
        ]
        if not all(w.can_unpack for w in weights):
            return None
        for rows in INT4_DEQUANTIZE_PROBE_ROWS:
            timings = _time_interleaved(_int4_paths(weights, rows, DTYPES[dtype]))
            if timings["unpacked"] < timings["kernel"]:
                return rows
    return None


def _int4_paths(weights: list[Int4Weight], rows: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One call per weight on ``rows`` tokens: through the int4 kernel, and unpacked."""
    inputs = {w.in_features: torch.randn(rows, w.in_features, dtype=dtype) for w in weights}

    def run(dequantize_min_rows: int | None) -> None:
        for w in weights:
            w.dequantize_min_rows = dequantize_min_rows
            w.matmul(inputs[w.in_features])

    return {"kernel": lambda: run(None), "unpacked": lambda: run(rows)}
