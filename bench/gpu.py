"""Decode speed of our engine on a GPU against HF peft's mixed-adapter generate, and the bandwidth floor.

Run (a GPU session: bench/gpu_device.sh runs exactly this, see docs/benchmarks.md):
      python3 bench/gpu.py --json $OUT/gpu.json
CPU smoke test (seconds):
      .venv/bin/python bench/gpu.py --device cpu --shapes tiny --new-tokens 4 --batches 2 --skip-peft

Everything is built where it runs, nothing big travels: a Llama with random weights (--shapes 8b:
Llama-3-8B's shapes, hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256;
tiny: a few MB) made straight on the device in the engine's dtype (bf16 on CUDA, fp32 on CPU),
saved as an HF checkpoint (safetensors + tests/engine/tiny.py's byte-level tokenizer) in a temp
dir, and max(--batches) random rank-16 peft adapters on all seven projections, saved there with
peft's save_pretrained (bench/engine.py's adapter recipe: random A, B ~ N(0, 0.02)).

Scenarios (each request its own adapter, greedy, EOS ignored, --new-tokens tokens each):
  one per --batches entry (default 32, 1, 64: the headline first, so a cut-short run has it),
  plus base only at each --base-batches entry (default 32).
Systems: our EngineCore in-process, stepped synchronously (bench/engine.py's ``run_engine``), and one
PeftModel holding the same adapters, ``generate(adapter_names=[...])`` on the left-padded batch
(``run_hf``; base only: inside ``disable_adapter()``). peft is timed over --peft-new-tokens tokens:
its decode steps cost the same whatever the context (per-adapter Python loops in every LoRA layer),
and 128 steps of it at batch 64 (seconds each) would take minutes of a 15-minute GPU lease.

ms per decode step = time from every request having its first token to the end / (tokens - 1),
median of --repeats runs after a warm-up (peft: --peft-repeats, warm-up of 2 tokens).
Bandwidth floor: the bytes one decode step must read at least (every base weight once, an untied
embedding not; each adapter in use at rank 16 in the serving dtype; the KV cache of every
sequence at that step, averaged over the decode steps) / bandwidth. The bandwidth is --bandwidth,
else the datasheet figure of the GPU by name (H100 SXM 3.35e12 B/s, H200 4.8e12, ...); a copy
bandwidth (bytes read + written) is also measured on the device in the run, and both floors are
printed. "share of floor" = floor / measured step time (1.0 = at the floor).

A failing system or scenario is reported (its error in the JSON) and the rest still runs; the JSON
(--json) is rewritten after every scenario, so a run cut short by a timeout leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import (
    ADAPTER_SEED,
    Result,
    Run,
    build_engine,
    chat_prompts,
    common_prefix,
    decode_step_bytes,
    memory_bandwidth_gbs,
    random_lora_config,
    randomize_lora_b,
    run_engine,
    run_hf,
    time_interleaved,
)
from bench.machine import cpu_name
from server.engine.core import EngineCore
from server.engine.kv_cache import kv_bytes_per_token
from server.model.factory import pick_dtype
from tests.engine.tiny import random_llama, save_checkpoint

SHAPES = {
    "8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    ),
}  # fmt: skip
# Datasheet memory bandwidth, B/s, by a substring of torch.cuda.get_device_name (first match wins).
DATASHEET_BANDWIDTH = (
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
)  # fmt: skip
RANK = 16
PEFT_WARM_UP_TOKENS = 2
T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    batch: int
    adapters: bool  # each request its own adapter; False: base model only

    @property
    def name(self) -> str:
        plural = "s" if self.batch > 1 else ""
        return f"batch {self.batch}, " + (f"{self.batch} adapter{plural}" if self.adapters else "base only")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    p.add_argument("--batches", default="32,1,64", help="batches with one adapter per request, run order")
    p.add_argument("--base-batches", default="32", help="base-only batches ('' for none)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (ours)")
    p.add_argument("--peft-new-tokens", type=int, default=16, help="tokens per request for peft")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median; +1 warm-up)")
    p.add_argument("--peft-repeats", type=int, default=1, help="timed runs of peft (+1 short warm-up)")
    p.add_argument("--skip-peft", action="store_true", help="time ours only (peft still saves adapters)")
    p.add_argument("--bandwidth", type=float, default=None, help="B/s for the floor (default: by GPU name)")
    p.add_argument("--time-budget-s", type=float, default=0, help="skip peft runs that would end after it")
    p.add_argument("--json", type=Path, default=None, help="write the results here (e.g. $OUT/gpu.json)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    p.add_argument("--workdir", default=None, help="where the temp checkpoint dir goes (default: $TMPDIR)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.base_batches = [int(b) for b in args.base_batches.split(",") if b.strip()]
    if not args.batches and not args.base_batches:
        p.error("no scenario: give --batches or --base-batches")
    if min(args.batches + args.base_batches) < 1 or args.repeats < 1 or args.peft_repeats < 1:
        p.error("batches, --repeats and --peft-repeats must be >= 1")
    if args.new_tokens < 2 or args.peft_new_tokens < 2:
        p.error("--new-tokens and --peft-new-tokens must be >= 2 (one decode step at least)")
    return args


# ---- the device: bandwidth, names ----


def datasheet_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(B/s, where the figure comes from) of ``device``'s memory by its name; None if unknown."""
    if device.type != "cuda":
        return None, f"no datasheet figure for {cpu_name()}"
    name = torch.cuda.get_device_name(device)
    for pattern, bandwidth in DATASHEET_BANDWIDTH:
        if pattern in name:
            return bandwidth, f"datasheet, {name}"
    return None, f"no datasheet figure for {name}"


def device_info(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Name, versions, nominal and measured bandwidth: the JSON's ``device`` field."""
    copy_gbs, read_gbs = memory_bandwidth_gbs(device=str(device), mib=1024 if device.type == "cuda" else 256)
    nominal, source = (args.bandwidth, "--bandwidth") if args.bandwidth else datasheet_bandwidth(device)
    if nominal is None:
        nominal, source = copy_gbs * 1e9, f"measured copy ({source})"
    import peft

    return {
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "type": device.type,
        "bandwidth_Bps": nominal,
        "bandwidth_source": source,
        "measured_copy_Bps": copy_gbs * 1e9,  # bytes read + written
        "measured_read_Bps": read_gbs * 1e9,
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }  # fmt: skip


# ---- the model and the adapters, built here ----


def build_checkpoint(args: argparse.Namespace, device: torch.device, root: Path):
    """The random HF model (kept: peft wraps it) and its checkpoint dir under ``root``."""
    dtype = pick_dtype(None, device)
    started = time.perf_counter()
    model = random_llama(args.seed, dtype=dtype, device=device, **SHAPES[args.shapes])
    path = save_checkpoint(model, root / "model")
    print(
        f"built the {args.shapes} checkpoint ({dtype}) in {time.perf_counter() - started:.1f} s", flush=True
    )
    return model, path


def build_adapters(hf_model, count: int, root: Path):
    """One PeftModel (wrapping ``hf_model`` in place) with ``count`` random adapters, each saved with
    save_pretrained to ``root/adapter{i}``; peft's default fp32 copies, as from_pretrained gives."""
    from peft import get_peft_model

    started = time.perf_counter()
    config = random_lora_config(RANK)
    torch.manual_seed(ADAPTER_SEED)
    peft_model = get_peft_model(hf_model, config, adapter_name="adapter0")
    randomize_lora_b(peft_model, "adapter0")
    for i in range(1, count):
        torch.manual_seed(ADAPTER_SEED + i)
        peft_model.add_adapter(f"adapter{i}", config)
        randomize_lora_b(peft_model, f"adapter{i}")
    peft_model.save_pretrained(root)  # one subfolder per adapter
    peft_model.eval()
    print(f"made {count} adapters in {time.perf_counter() - started:.1f} s", flush=True)
    return peft_model, [root / f"adapter{i}" for i in range(count)]


def build_ours(args: argparse.Namespace, checkpoint: Path, paths: list[Path]) -> EngineCore:
    """EngineCore on the device with a slot per adapter; merging and prefix caching off (every run
    then measures the side path and a full prefill)."""
    started = time.perf_counter()
    settings = SimpleNamespace(
        model=str(checkpoint), dtype=None, quantization="auto", num_adapters=max(len(paths), 1),
        max_lora_rank=RANK, batch=max(args.batches + args.base_batches), new_tokens=args.new_tokens,
    )  # fmt: skip
    core = build_engine(settings, args.device, merge_policy="off", prefix_caching="off",
                        max_cpu_adapters_bytes=64 << 30)  # fmt: skip
    for i, path in enumerate(paths):
        core.add_adapter(f"adapter{i}", path)
    print(f"loaded our engine ({core.loaded.dtype}) in {time.perf_counter() - started:.1f} s", flush=True)
    return core


# ---- timing ----


class Budget:
    """The wall-clock left for peft runs (--time-budget-s); 0: no limit."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds if seconds > 0 else None
        self.row_step_s: float | None = None  # peft seconds per sequence per decode step, last seen

    def refuses(self, batch: int, tokens: int, runs: int) -> str | None:
        if self.deadline is None or self.row_step_s is None:
            return None
        estimate = self.row_step_s * batch * tokens * runs
        left = self.deadline - time.monotonic()
        return (
            f"skipped: ~{estimate:.0f} s estimated, {left:.0f} s of --time-budget-s left"
            if estimate > left
            else None
        )


def time_ours(core: EngineCore, prompts, scenario: Scenario, args) -> Result:
    adapters = [f"adapter{i}" if scenario.adapters else None for i in range(scenario.batch)]
    settings = SimpleNamespace(repeats=args.repeats, batch=scenario.batch, new_tokens=args.new_tokens)
    run = lambda: run_engine(core, prompts, adapters, args.new_tokens)  # noqa: E731
    return time_interleaved({"ours": run}, settings)["ours"]


def time_peft(peft_model, tokenizer, prompts, scenario: Scenario, args) -> Result:
    names = [f"adapter{i}" for i in range(scenario.batch)] if scenario.adapters else None

    def generate(tokens: int) -> Run:
        scope = contextlib.nullcontext() if scenario.adapters else peft_model.disable_adapter()
        with scope:
            return run_hf(peft_model, tokenizer, prompts, tokens, adapter_names=names)

    settings = SimpleNamespace(
        repeats=args.peft_repeats, batch=scenario.batch, new_tokens=args.peft_new_tokens
    )
    runs = {"peft": lambda: generate(args.peft_new_tokens)}
    return time_interleaved(runs, settings, {"peft": lambda: generate(PEFT_WARM_UP_TOKENS)})["peft"]


def attempt(label: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """``fn()``, or (None, the error) after printing its traceback: one failure stops nothing else."""
    try:
        return fn(), None
    except Exception as error:  # reported in the output and the JSON
        print(f"{label} failed:", flush=True)
        traceback.print_exc()
        return None, f"{type(error).__name__}: {error}"


# ---- bytes and the report ----


def step_bytes(core: EngineCore, prompts, scenario: Scenario, new_tokens: int) -> dict[str, int]:
    """Bytes one decode step reads at least, averaged over the decode steps (see the docstring)."""
    base, lora = decode_step_bytes(core, scenario.batch if scenario.adapters else 0)
    per_token = kv_bytes_per_token(core.loaded.checkpoint.config, core.loaded.dtype)
    kv = int(per_token * sum(len(p) + new_tokens / 2 for p in prompts))  # step k reads P + k rows
    return {"base": base, "lora": lora, "kv": kv, "total": base + lora + kv}


def system_row(result: Result | None, error: str | None, floors: dict[str, float] | None) -> dict[str, Any]:
    if result is None:
        return {"error": error}
    row: dict[str, Any] = {"step_ms": result.step_ms, "decode_tok_s": result.decode_tps,
                           "e2e_tok_s": result.e2e_tps, "spread": result.spread, "error": None}  # fmt: skip
    for key, floor_ms in (floors or {}).items():
        row[f"share_of_{key}"] = floor_ms / result.step_ms
    return row


def agreement(ours: Result | None, theirs: Result | None) -> float | None:
    """Mean greedy tokens two systems share before their first difference (a sanity check only)."""
    if ours is None or theirs is None:
        return None
    prefixes = [common_prefix(a, b) for a, b in zip(ours.tokens, theirs.tokens, strict=True)]
    return sum(prefixes) / len(prefixes)


def run_scenario(scenario, core, peft_model, tokenizer, args, device: dict, budget: Budget) -> dict:
    prompts = chat_prompts(tokenizer, scenario.batch)
    record: dict[str, Any] = {"name": scenario.name, "batch": scenario.batch, "adapters": scenario.adapters,
                              "prompt_tokens": [len(p) for p in prompts]}  # fmt: skip
    floors = None
    if core is not None:
        nbytes = step_bytes(core, prompts, scenario, args.new_tokens)
        floors = {"floor": nbytes["total"] / device["bandwidth_Bps"] * 1e3,
                  "measured_floor": nbytes["total"] / device["measured_copy_Bps"] * 1e3}  # fmt: skip
        record.update(
            bytes_per_step=nbytes, floor_ms=floors["floor"], measured_floor_ms=floors["measured_floor"]
        )
        ours, error = attempt(f"ours, {scenario.name}", lambda: time_ours(core, prompts, scenario, args))
    else:
        ours, error = None, "the engine did not load"
    record["ours"] = system_row(ours, error, floors)
    theirs = None
    if args.skip_peft:
        record["peft"] = {"skipped": "--skip-peft"}
    elif skipped := budget.refuses(scenario.batch, args.peft_new_tokens, 1 + args.peft_repeats):
        record["peft"] = {"skipped": skipped}
    else:
        timed = lambda: time_peft(peft_model, tokenizer, prompts, scenario, args)  # noqa: E731
        theirs, error = attempt(f"peft, {scenario.name}", timed)
        record["peft"] = {**system_row(theirs, error, None), "new_tokens": args.peft_new_tokens}
        if theirs is not None:
            budget.row_step_s = theirs.step_ms / 1e3 / scenario.batch
    if ours is not None and theirs is not None:
        record["ours_vs_peft"] = ours.decode_tps / theirs.decode_tps
        record["tokens_agreeing"] = agreement(ours, theirs)  # before the first difference, mean
    return record


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| scenario | ours ms/step | ours tok/s | MB/step | floor ms | share of floor "
        "| floor ms (measured BW) | share | peft ms/step | peft tok/s | ours / peft |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["scenarios"]:
        ours, peft = s["ours"], s["peft"]
        ours_ms = f"error: {ours['error']}" if ours.get("error") else fmt(ours.get("step_ms"), ".2f")
        peft_ms = peft.get("skipped") or peft.get("error") or fmt(peft.get("step_ms"), ".2f")
        mb = s["bytes_per_step"]["total"] / 1e6 if "bytes_per_step" in s else None
        ratio = s.get("ours_vs_peft")
        cells = [
            s["name"], ours_ms, fmt(ours.get("decode_tok_s"), ".0f"), fmt(mb, ".0f"),
            fmt(s.get("floor_ms"), ".2f"), fmt(ours.get("share_of_floor"), ".0%"),
            fmt(s.get("measured_floor_ms"), ".2f"), fmt(ours.get("share_of_measured_floor"), ".0%"),
            peft_ms, fmt(peft.get("decode_tok_s"), ".0f"), "-" if ratio is None else f"{ratio:.1f}x",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON (atomically: a run killed meanwhile leaves the previous one) and the markdown table."""
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(report) + "\n")


def print_header(report: dict[str, Any]) -> None:
    d, m = report["device"], report["model"]
    print(f"command: {report['command']}")
    print(f"device: {d['name']} ({d['type']}); cpu {d['cpu']}; versions {d['versions']}")
    print(f"bandwidth for the floor: {d['bandwidth_Bps'] / 1e9:.0f} GB/s ({d['bandwidth_source']}); measured "
          f"copy {d['measured_copy_Bps'] / 1e9:.0f} GB/s (read + written), "
          f"read {d['measured_read_Bps'] / 1e9:.0f} GB/s")  # fmt: skip
    print(
        f"model: {report['shapes']} random Llama, {m['parameters'] / 1e6:,.1f} M parameters, {m['dtype']}; "
        f"rank-{RANK} adapters on all seven projections; ours {report['new_tokens']} new tokens x "
        f"{report['repeats']} runs, peft {report['peft_new_tokens']} x {report['peft_repeats']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    scenarios = [Scenario(b, True) for b in args.batches] + [Scenario(b, False) for b in args.base_batches]
    budget = Budget(args.time_budget_s)  # counts from the start: the setup spends it too
    root = Path(tempfile.mkdtemp(prefix="loraplex-gpu-bench-", dir=args.workdir))
    try:
        hf_model, checkpoint = build_checkpoint(args, device, root)
        report: dict[str, Any] = {
            "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
            "device": device_info(device, args), "shapes": args.shapes,
            "model": {**SHAPES[args.shapes], "parameters": sum(p.numel() for p in hf_model.parameters()),
                      "dtype": str(hf_model.dtype).removeprefix("torch.")},
            "rank": RANK, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "peft_new_tokens": args.peft_new_tokens, "peft_repeats": args.peft_repeats, "scenarios": [],
        }  # fmt: skip
        print_header(report)
        peft_model, paths = build_adapters(hf_model, max(args.batches, default=1), root / "adapters")
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # generate pads the batch
        core, _ = attempt("loading our engine", lambda: build_ours(args, checkpoint, paths))
        for scenario in scenarios:
            record = run_scenario(scenario, core, peft_model, tokenizer, args, report["device"], budget)
            report["scenarios"].append(record)
            brief = {key: record.get(key) for key in ("ours", "peft", "ours_vs_peft", "tokens_agreeing")}
            print(f"{scenario.name}: {json.dumps(brief)}", flush=True)
            write_outputs(report, args)
        if device.type == "cuda":
            report["device"]["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        write_outputs(report, args)
        print()
        print(markdown_table(report))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
