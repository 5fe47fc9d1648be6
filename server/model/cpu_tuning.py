"""CPU kernel choices made by measurement when the server starts, cached per CPU model.

The CPUs this runs on disagree on what is fastest (an AMD EPYC Zen 3 runs bf16 GEMMs about 2x
slower than fp32, a Zen 5 or an Intel Xeon with AVX512-BF16/AMX about 3x faster; ``W·xᵀ`` beats
``x·Wᵀ`` for decode-sized batches on one and loses on another), so nothing here is hard-coded
from one machine. For the model's own GEMM shapes at a decode-sized batch we time:

- the compute dtype (float32, bfloat16) when the user did not fix one with ``--dtype``;
- the layout of the base GEMMs for small batches (``x·Wᵀ`` or ``(W·xᵀ)ᵀ``) in that dtype;
- the dtype of the LoRA slot buffers (bf16 batched products are slow on some CPUs, so the
  side path may stay in fp32 under a bf16 base: more bytes, but faster and more exact);
- the number of torch threads (all cores, or one fewer, which leaves a core to the HTTP side).

The sample weights are random, of the model's real shapes, and large enough (> 2x a typical L3)
that the timing is memory-bound like a real decode step. The result is stored as JSON under
``<cache_dir>/tuning/`` keyed by the CPU model, its ISA flags, torch's version, the shapes and the
core count, and reused on later starts; ``describe()`` is the one line the server logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TUNING_FORMAT = 1  # bump when what is measured changes, so old cached choices are not reused
DECODE_ROWS = 8  # the batch the choices are measured at (decode steps are this size or near it)
SAMPLE_BYTES = 96 << 20  # weights touched per timed pass: beyond L3, so memory-bound as in decode
TIMED_PASSES = 5
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CANDIDATE_DTYPES = ("float32", "bfloat16")  # what --dtype unset chooses between


@dataclass(frozen=True)
class GemmShapes:
    """The weight shapes [out, in] of one decoder layer's base GEMMs, plus the LM head and LoRA."""

    layer: tuple[tuple[int, int], ...]  # fused q|k|v, o, gate|up, down
    lm_head: tuple[int, int]
    num_layers: int

    @classmethod
    def of(cls, config) -> GemmShapes:
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        layer = ((q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter))
        return cls(layer, (config.vocab_size, hidden), config.num_hidden_layers)


@dataclass(frozen=True)
class CpuKernelChoice:
    """What the CPU step uses. ``timings_ms``: one decode pass of the sampled GEMMs per candidate."""

    dtype: str  # compute dtype of the base model (the user's --dtype when given)
    w_xt: bool  # small-batch base GEMMs as (W·xᵀ)ᵀ instead of x·Wᵀ
    lora_dtype: str  # dtype of the LoRA slot buffers and the side-path products
    num_threads: int
    cpu: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # or "cached"
    seconds: float = 0.0  # how long measuring took

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_lora_dtype(self) -> torch.dtype:
        return DTYPES[self.lora_dtype]

    def describe(self) -> str:
        layout = "W·xᵀ" if self.w_xt else "x·Wᵀ"
        timings = ", ".join(f"{k} {v:.1f}" for k, v in self.timings_ms.items())
        how = f"measured in {self.seconds:.1f} s" if self.source == "measured" else "cached"
        return (
            f"cpu tuning: {self.cpu} -> {self.dtype} base, {layout} GEMMs, LoRA in {self.lora_dtype}, "
            f"{self.num_threads} threads ({how}; ms per decode pass: {timings})"
        )


def cpu_identity() -> str:
    """CPU model name, family/model and the ISA flags that decide kernel speed."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    family = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{info.get('model name', 'unknown CPU')} ({family}; {' '.join(isa) or 'no AVX2'})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def choose(shapes: GemmShapes, dtype: str | None, cache_dir: Path) -> CpuKernelChoice:
    """The cached choice for this CPU and these shapes, else a fresh measurement (then cached)."""
    cores = os.cpu_count() or 1
    key = _cache_key(shapes, dtype, cores)
    path = cache_dir / "tuning" / f"cpu-{key}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached
    choice = measure(shapes, dtype, cores)
    _write_cached(path, choice)
    return choice


def _cache_key(shapes: GemmShapes, dtype: str | None, cores: int) -> str:
    text = "|".join([cpu_identity(), _cpuinfo().get("flags", ""), torch.__version__, repr(shapes),
                     str(dtype), str(cores), str(TUNING_FORMAT)])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cached(path: Path) -> CpuKernelChoice | None:
    try:
        data = json.loads(path.read_text())
        return CpuKernelChoice(**{**data, "source": "cached"})
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: measure again


def _write_cached(path: Path, choice: CpuKernelChoice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(choice), indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache dir only costs a measurement per start
        log.warning("could not cache the CPU tuning in %s: %s", path, exc)


def measure(shapes: GemmShapes, dtype: str | None, cores: int) -> CpuKernelChoice:
    """Time the candidates on random weights of the model's shapes; pick the fastest of each.

    Candidates run interleaved, one pass each per round, so a burst of load from another process
    lands on all of them instead of deciding the choice.
    """
    started = time.perf_counter()
    names = [dtype] if dtype is not None else list(CANDIDATE_DTYPES)
    with torch.inference_mode():
        weights = {name: _sample_weights(shapes, DTYPES[name]) for name in names}
        gemms = {
            f"{name} {_LAYOUTS[w_xt]}": _gemm_pass(weights[name], w_xt) for name in names for w_xt in _LAYOUTS
        }
        timings = _time_interleaved(gemms)
        best = min(timings, key=timings.get)
        best_dtype, best_w_xt = best.split()[0], best.endswith(_LAYOUTS[True])
        if best_dtype != "float32":
            lora = {f"LoRA {name}": _lora_pass(shapes, DTYPES[name]) for name in ("float32", best_dtype)}
            timings.update(_time_interleaved(lora))
        lora_dtype = (
            best_dtype
            if best_dtype == "float32"
            else min(("float32", best_dtype), key=lambda name: timings[f"LoRA {name}"])
        )
        threads = _pick_threads(gemms[best], cores, timings, best)
    return CpuKernelChoice(
        dtype=best_dtype, w_xt=best_w_xt, lora_dtype=lora_dtype, num_threads=threads,
        cpu=cpu_identity(), timings_ms=timings, seconds=time.perf_counter() - started,
    )  # fmt: skip


_LAYOUTS = {False: "x·Wᵀ", True: "W·xᵀ"}


def _sample_weights(shapes: GemmShapes, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random layer weights of the real shapes, enough layers to exceed SAMPLE_BYTES (at most all)."""
    layer_bytes = sum(o * i for o, i in shapes.layer) * torch.empty((), dtype=dtype).element_size()
    num_layers = max(1, min(shapes.num_layers, -(-SAMPLE_BYTES // layer_bytes)))
    return [torch.randn(shape, dtype=dtype) for _ in range(num_layers) for shape in shapes.layer]


def _gemm_pass(weights: list[torch.Tensor], w_xt: bool, rows: int = DECODE_ROWS) -> Callable[[], None]:
    """One pass of decode-sized GEMMs over ``weights`` in one layout."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

    def one_pass() -> None:
        for weight in weights:
            base_gemm(inputs[weight.shape[1]], weight, None, w_xt)

    return one_pass


def _lora_pass(shapes: GemmShapes, dtype: torch.dtype, slots: int = 8, rank: int = 16) -> Callable[[], None]:
    """The shrink + expand batched products of 8 slots at rank 16, over every layer's shapes."""
    a = [torch.randn(slots, i, rank, dtype=dtype) for _ in range(shapes.num_layers) for _, i in shapes.layer]
    b = [torch.randn(slots, rank, o, dtype=dtype) for _ in range(shapes.num_layers) for o, _ in shapes.layer]
    x = {i: torch.randn(slots, 1, i, dtype=dtype) for _, i in shapes.layer}

    def one_pass() -> None:
        for ai, bi in zip(a, b, strict=True):
            torch.bmm(torch.bmm(x[ai.shape[1]], ai), bi)

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


def _pick_threads(best_pass: Callable[[], None], cores: int, timings: dict[str, float], best: str) -> int:
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
    timings.update(both)
    fewer, now = both[f"{cores - 1} threads"], both[f"{previous} threads"]
    return cores - 1 if fewer <= now * 1.03 else previous


def base_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w_xt: bool) -> torch.Tensor:
    """x [T, in] · weight [out, in]ᵀ (+ bias) → [T, out], contiguous, in the chosen layout."""
    if w_xt:
        y = torch.mm(weight, x.T).T.contiguous()
        return y if bias is None else y.add_(bias)
    return F.linear(x, weight, bias)
