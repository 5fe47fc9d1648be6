"""Decode throughput of our engine (base only, and N distinct adapters) against HF transformers and peft.

Run:  .venv/bin/python bench/engine.py          (the issue's setting: smollm2-135m-instruct fp32,
                                                 batch 8, 8 distinct rank-16 adapters on all seven
                                                 projections, 32 new tokens, median of 3 repeats)
      .venv/bin/python bench/engine.py --profile   (adds a per-code-path split of one decode step)

Four systems generate for the SAME chat prompts (one question per request, all different; 35-48
tokens for SmolLM2, whose chat template adds a default system prompt):
  1. loraplex, base model only: B requests through EngineCore, stepped synchronously;
  2. loraplex, B requests over N distinct adapters, round-robin (request i -> adapter i mod N);
  3. HF transformers ``model.generate`` on the left-padded batch, greedy;
  4. HF transformers + peft: one PeftModel holding the same N adapters (``load_adapter``), and
     ``generate(adapter_names=[...])`` on the mixed batch, the baseline a user would otherwise pick.
Every request generates exactly --new-tokens tokens (EOS ignored; HF: min_new_tokens=max_new_tokens).

Decode tok/s = B * (new_tokens - 1) / (time from the moment every request has its first token to the
end); end-to-end tok/s = B * new_tokens / (time from submitting the batch to the end), prefill
included. Figures are medians over --repeats runs after one warm-up run of each system, timed with
perf_counter; the systems run interleaved, round by round, so a burst of load from other processes
does not land on one of them. The spread (max-min over median of decode tok/s) and the cores other
processes kept busy meanwhile are printed to show noise.

Memory-bandwidth floor: a decode step reads every base weight once (a tied LM head counted once)
plus, for each distinct adapter in the batch, its A and B slot buffers, which are padded to
--max-lora-rank. Bytes per step / measured step time = achieved GB/s, printed next to STREAM-like
copy and read bandwidths of a 256 MiB tensor measured in the same run. No timing here is asserted on.

--profile adds a split of one decode step (base only and mixed) by code path, from thin timing
wrappers around the engine's own functions, and torch.profiler's top aten ops of the mixed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from server.config import ALL_TARGET_MODULES, EngineConfig, ModelConfig, default_cache_dir
from server.engine.core import EngineCore
from server.engine.kv_cache import kv_bytes_per_token
from server.engine.sampler import SamplingParams
from server.model.factory import load_model
from server.ops.cpu_info import cpu_snapshot, other_load

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain in simple words what a LoRA adapter does to a language model.", "Name a famous painter.",
    "How do bees make honey, and why do they need so much of it in winter?",
    "Give me a synonym for happy.", "Why is the sky blue during the day but red at sunset?",
    "What is 12 times 12?", "Describe a cat in one line.", "Who wrote Hamlet, and when?",
    "What is the boiling point of water at the top of a high mountain?",
    "Suggest a name for a small bakery.", "Translate 'good morning' into Spanish.",
    "What does a compiler do?", "Tell me one fact about the Moon.",
]  # fmt: skip
ADAPTER_SEED = 1234
LORA_B_STD = 0.02
MAX_PROMPT_TOKENS = 256  # chat_prompts stay far below this; it sizes the prefill budget and KV cache


@dataclass(frozen=True)
class Run:
    """One timed batch: seconds of the decode phase and of the whole batch, and the tokens made."""

    decode_s: float
    total_s: float
    tokens: list[list[int]]


@dataclass(frozen=True)
class Result:
    """Medians over the repeats of one system."""

    decode_tps: float
    e2e_tps: float
    step_ms: float  # one decode step (all B sequences)
    spread: float  # (max - min) / median of decode tok/s
    noise: float  # cores other processes kept busy during this system's timed runs (median)
    tokens: list[list[int]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF checkpoint dir")
    p.add_argument("--batch", type=int, default=8, help="requests in the batch (B)")
    p.add_argument("--num-adapters", type=int, default=8, help="distinct adapters (N), round-robin")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--max-lora-rank", type=int, default=None, help="engine slot padding (default: --rank)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system (median; +1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--dtype", default=None, help="engine dtype (default: as the server: measured)")
    p.add_argument(
        "--quantization", default="auto", help="as `loraplex serve --quantization` (default: auto)"
    )
    p.add_argument("--skip-hf", action="store_true", help="skip the HF and peft baselines")
    p.add_argument("--profile", action="store_true", help="split one mixed decode step by code path")
    args = p.parse_args()
    args.max_lora_rank = args.max_lora_rank or args.rank
    if args.new_tokens < 2 or args.batch < 1 or args.num_adapters < 1 or args.repeats < 1:
        p.error("need --new-tokens >= 2 and --batch, --num-adapters, --repeats >= 1")
    if args.max_lora_rank < args.rank:
        p.error("--max-lora-rank must be >= --rank (the engine refuses adapters above it)")
    return args


# ---- setup: prompts, adapters, engine ----


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """One chat-templated prompt per request; the question differs per request (cycled past 16)."""
    prompts = []
    for i in range(batch):
        question = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def adapter_dirs(base_dir: Path, count: int, rank: int) -> list[Path]:
    """N random peft adapters, created once and cached under <cache dir>/bench-adapters/."""
    key = hashlib.sha256(f"{base_dir.resolve()}|{rank}|{ALL_TARGET_MODULES}|{LORA_B_STD}".encode())
    root = default_cache_dir() / "bench-adapters" / f"{base_dir.name}-r{rank}-{key.hexdigest()[:10]}"
    paths = [root / f"adapter{i}" for i in range(count)]
    for i, path in enumerate(paths):
        if not (path / "adapter_config.json").exists():
            save_random_adapter(base_dir, path, rank, seed=ADAPTER_SEED + i)
    return paths


def save_random_adapter(base_dir: Path, out: Path, rank: int, seed: int) -> None:
    """A peft LoRA on all seven projections: A from peft's random init, B ~ N(0, LORA_B_STD)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, random_lora_config(rank))
    randomize_lora_b(peft_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    peft_model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written adapter is never picked up by a later run


def random_lora_config(rank: int):
    """peft's LoraConfig of the bench adapters: all seven projections, alpha = 2 * rank, random A."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_TARGET_MODULES),
                      init_lora_weights=False)  # fmt: skip


def randomize_lora_b(peft_model, adapter_name: str = "default") -> None:
    """B ~ N(0, LORA_B_STD) for one adapter of ``peft_model`` (A keeps peft's random init), so the
    adapter changes the outputs without swamping them."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".lora_B.{adapter_name}." in name:
                param.normal_(0, LORA_B_STD)


def build_engine(args, device: str = "cpu", **overrides) -> EngineCore:
    """EngineCore with slots for every adapter, room for the batch, and a KV cache sized to the run;
    ``overrides`` are further EngineConfig fields."""
    config = EngineConfig(
        max_loras=args.num_adapters,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(2048, args.batch * MAX_PROMPT_TOKENS),  # all prefills in one step
        **overrides,
    )
    loaded = load_model(
        ModelConfig(model=args.model, dtype=args.dtype, device=device, quantization=args.quantization), config
    )
    per_token = kv_bytes_per_token(loaded.checkpoint.config, loaded.dtype)
    tokens = 2 * args.batch * (MAX_PROMPT_TOKENS + args.new_tokens + config.kv_block_size)  # 2x headroom
    return EngineCore(loaded, dataclasses.replace(config, kv_cache_bytes=per_token * tokens))


# ---- timing ----


def run_engine(core: EngineCore, prompts, adapters, new_tokens: int) -> Run:
    """Submit the batch, step until idle; decode starts when every request has its first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, params, adapters[i])
    first_token_at = None
    while core.has_work:
        for delta in core.step():
            tokens[delta.request_id].extend(delta.token_ids)
        if first_token_at is None and all(tokens.values()):
            first_token_at = time.perf_counter()
    end = time.perf_counter()
    return Run(end - first_token_at, end - start, list(tokens.values()))


class FirstTokenClock:
    """A logits processor that only notes when generate produced its first logits (prefill done)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            if scores.is_cuda:  # the prefill's kernels were only queued
                torch.cuda.synchronize(scores.device)
            self.first = time.perf_counter()
        return scores


def run_hf(model, tokenizer, prompts, new_tokens: int, adapter_names=None) -> Run:
    """HF generate on the left-padded batch, greedy, exactly new_tokens per row."""
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    device = next(model.parameters()).device  # the model's (a GPU's): pad builds CPU tensors
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = FirstTokenClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]), **extra,
        )  # fmt: skip
        end = time.perf_counter()
    tokens = out[:, batch["input_ids"].shape[1] :].tolist()
    return Run(end - clock.first, end - start, tokens)


def summarize(runs: list[Run], noise: list[float], batch: int, new_tokens: int) -> Result:
    """Medians of the timed runs of one system."""
    decode = [batch * (new_tokens - 1) / r.decode_s for r in runs]
    e2e = [batch * new_tokens / r.total_s for r in runs]
    mid = statistics.median(decode)
    step_ms = statistics.median(r.decode_s for r in runs) / (new_tokens - 1) * 1e3
    spread = (max(decode) - min(decode)) / mid
    return Result(mid, statistics.median(e2e), step_ms, spread, statistics.median(noise), runs[-1].tokens)


def time_interleaved(
    systems: dict[str, Callable[[], Run]], args, warm_ups: dict[str, Callable[[], Run]] | None = None
) -> dict[str, Result]:
    """One warm-up run of each system (``warm_ups[name]`` instead where given: a shorter one), then
    ``repeats`` rounds that run every system once.

    Interleaving spreads a burst of load from other processes over all systems instead of
    skewing one of them; each system's runs also record how busy the other processes were.
    """
    for name, fn in systems.items():
        (warm_ups or {}).get(name, fn)()
    runs: dict[str, list[Run]] = {name: [] for name in systems}
    noise: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, fn in systems.items():
            since = cpu_snapshot()
            runs[name].append(fn())
            noise[name].append(other_load(since))
    return {name: summarize(runs[name], noise[name], args.batch, args.new_tokens) for name in systems}


def engine_systems(core: EngineCore, prompts, args) -> dict[str, Callable[[], Run]]:
    """Our engine, base only and over N distinct adapters (registered here, from peft dirs)."""
    paths = adapter_dirs(core.loaded.checkpoint.path, args.num_adapters, args.rank)
    for i, path in enumerate(paths):
        core.add_adapter(f"adapter{i}", path)
    mixed = [f"adapter{i % args.num_adapters}" for i in range(args.batch)]
    base = [None] * args.batch
    return {
        "loraplex, base only": lambda: run_engine(core, prompts, base, args.new_tokens),
        f"loraplex, {args.num_adapters} adapters mixed": lambda: run_engine(
            core, prompts, mixed, args.new_tokens
        ),
    }


def hf_systems(core: EngineCore, prompts, args) -> dict[str, Callable[[], Run]]:
    """Bare HF generate, and peft's mixed-batch generate over the same adapters (a second copy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, tok = core.loaded.checkpoint.path, core.tokenizer
    paths = adapter_dirs(base_dir, args.num_adapters, args.rank)
    names = [f"adapter{i % args.num_adapters}" for i in range(args.batch)]
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(peft_base, paths[0], adapter_name="adapter0")  # wraps in place
    for i, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"adapter{i}")
    peft_model.eval()
    return {
        "HF generate, base": lambda: run_hf(hf, tok, prompts, args.new_tokens),
        f"HF + peft, {args.num_adapters} adapters mixed": lambda: run_hf(
            peft_model, tok, prompts, args.new_tokens, adapter_names=names
        ),
    }


# ---- bandwidth ----


def memory_bandwidth_gbs(repeats: int = 10, device: str = "cpu", mib: int = 256) -> tuple[float, float]:
    """STREAM-like (copy, read) bandwidth on a ``mib`` MiB fp32 tensor on ``device``, best of runs, in GB/s.

    copy counts bytes read + written (dst.copy_(src)); read is a sum over the tensor, the access
    pattern of a decode step's weight reads. On CUDA each timing ends with a synchronize.
    """
    src = torch.ones(mib * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(src.device)) if src.is_cuda else (lambda: None)
    copy_s = read_s = float("inf")
    for _ in range(repeats + 1):  # the first round warms up (page faults, thread start)
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        middle = time.perf_counter()
        src.sum()
        sync()
        copy_s, read_s = min(copy_s, middle - start), min(read_s, time.perf_counter() - middle)
    return 2 * src.nbytes / copy_s / 1e9, src.nbytes / read_s / 1e9


def decode_step_bytes(core: EngineCore, num_slots_read: int) -> tuple[int, int]:
    """(base bytes, LoRA bytes) one decode step reads at least: each weight once, used slots padded."""
    model = core.loaded.model
    base = sum(p.nbytes for p in model.parameters())  # parameters() yields a tied LM head once
    if model.lm_head is not model.embed_tokens:
        base -= model.embed_tokens.nbytes  # untied: only the batch's few embedding rows are read
    per_slot = sum((m.lora_a.nbytes + m.lora_b.nbytes) // m.lora_a.shape[0] for _, m in model.lora_layers())
    return base, per_slot * num_slots_read


# ---- where a decode step's time goes (--profile) ----

MISSING = object()
FORWARD = "model forward (total)"
STEP = "engine step (total)"
OTHER_OPS = "other model ops (SiLU gates, embedding, RoPE rows, ...)"
GLUE = "rest of the step (Python glue)"
SPLIT_ORDER = (
    "base matmuls (qkv, o, gate_up, down)", "LoRA ops (add_lora)", "attention (KV gather + SDPA)",
    "LM head matmul", "residual adds + RMS norms", "RoPE + KV write", "build ForwardBatch", "sampling",
    "scheduler (schedule + postprocess)",
    "detokenize + deltas",
)  # fmt: skip
MODEL_PATHS = 6  # SPLIT_ORDER's first entries run inside the model's forward


class StepSplit:
    """Wall time per code path, summed by thin wrappers around the engine's own functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self._undo.append((owner, name, vars(owner).get(name, MISSING)))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, value in reversed(self._undo):
            if value is MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._undo.clear()


def instrument(core: EngineCore, split: StepSplit) -> None:
    """Wrap the hot code paths (CPU ops are synchronous, so wall time is their cost)."""
    import server.model.llama as llama_module
    import server.model.lora_linear as lora_module

    base, lora, attn, head, norms, rope, build, sample, sched, emit = SPLIT_ORDER
    split.wrap(lora_module, "base_linear", base)
    for module in core.loaded.model.modules():  # a quantized base reads its codes, not base_linear
        if isinstance(module, lora_module.MultiLoRALinear) and module.quantized is not None:
            split.wrap(module.quantized, "matmul", base)
    split.wrap(core.loaded.model, "_logits", head)  # the int8 head or the dense one
    split.wrap(llama_module.DecoderLayer, "_attention", attn)
    model = core.loaded.model
    for ops in {id(layer.attention_ops): layer.attention_ops for layer in model.layers}.values():
        split.wrap(ops, "rope_and_cache", rope)  # one object shared by the layers: wrapped once
    for ops in {id(layer.norm_ops): layer.norm_ops for layer in model.layers}.values():
        split.wrap(ops, "add_rms_norm", norms)
    for _, module in core.loaded.model.lora_layers():
        split.wrap(module, "_add_lora", lora)
    split.wrap(core.runner, "model", FORWARD)
    split.wrap(core.runner, "build_batch", build)
    split.wrap(core.runner.sampler, "sample", sample)
    split.wrap(core.scheduler, "schedule", sched)
    split.wrap(core.scheduler, "postprocess", sched)
    split.wrap(core, "_emit", emit)


def prefill(core: EngineCore, prompts, adapters, new_tokens: int) -> None:
    """Submit one batch and step until every request has its first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(f"p{i}", prompt, params, adapters[i])
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(d.request_id for d in core.step())


def split_decode_step(core: EngineCore, prompts, adapters, new_tokens: int) -> dict[str, float]:
    """Milliseconds per decode step for each code path, the totals, and the remainders."""
    prefill(core, prompts, adapters, new_tokens)
    split, steps = StepSplit(), 0
    instrument(core, split)
    try:
        while core.has_work:
            start = time.perf_counter()
            core.step()
            split.seconds[STEP] += time.perf_counter() - start
            steps += 1
    finally:
        split.restore()
    ms = {label: split.seconds[label] / steps * 1e3 for label in (*SPLIT_ORDER, FORWARD, STEP)}
    ms[OTHER_OPS] = ms[FORWARD] - sum(ms[k] for k in SPLIT_ORDER[:MODEL_PATHS])
    ms[GLUE] = ms[STEP] - ms[FORWARD] - sum(ms[k] for k in SPLIT_ORDER[MODEL_PATHS:])
    return ms


def top_ops(core: EngineCore, prompts, adapters, new_tokens: int, rows: int = 15) -> str:
    """torch.profiler table of the aten ops of one batch's decode steps, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    prefill(core, prompts, adapters, new_tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while core.has_work:
            core.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def print_profile(core: EngineCore, prompts, args) -> None:
    mixed = [f"adapter{i % args.num_adapters}" for i in range(args.batch)]
    start = cpu_snapshot()
    base = split_decode_step(core, prompts, [None] * args.batch, args.new_tokens)
    lora = split_decode_step(core, prompts, mixed, args.new_tokens)
    print("\nOne decode step by code path (mean over the decode steps of one batch, ms; other processes "
          f"kept {other_load(start):.2f} cores busy meanwhile):\n")  # fmt: skip
    print("| code path | base only ms | mixed ms | mixed % of step |\n| --- | ---: | ---: | ---: |")
    order = (*SPLIT_ORDER[:MODEL_PATHS], OTHER_OPS, FORWARD, *SPLIT_ORDER[MODEL_PATHS:], GLUE, STEP)
    for label in order:
        print(f"| {label} | {base[label]:.2f} | {lora[label]:.2f} | {100 * lora[label] / lora[STEP]:.0f}% |")
    print(f"\ntorch.profiler, {args.new_tokens - 1} mixed decode steps, top ops by self CPU time:")
    print(top_ops(core, prompts, mixed, args.new_tokens))


# ---- report ----


def print_header(args, core: EngineCore, prompts, others: float) -> None:
    import peft

    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"{platform.system()} {platform.machine()}")  # fmt: skip
    print(
        f"noise: other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during this run"
    )
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")  # fmt: skip
    lens = sorted(len(p) for p in prompts)
    dtype = str(core.loaded.dtype).removeprefix("torch.")
    kernels = core.loaded.kernels.describe() if core.loaded.kernels else "not tuned"
    print(f"engine: {dtype}; {kernels}")
    print(f"setting: {args.model} CPU (HF, peft fp32), batch {args.batch}, {args.num_adapters} adapters of "
          f"rank {args.rank} on {len(ALL_TARGET_MODULES)} projections (round-robin), {args.new_tokens} new "
          f"tokens per request (EOS ignored), prompts {lens[0]}-{lens[-1]} tokens, median of {args.repeats} "
          f"runs after 1 warm-up")  # fmt: skip
    print(
        f"note: engine LoRA slots are padded to max_lora_rank={args.max_lora_rank}; decode reads every "
        "used slot at that rank, so a larger --max-lora-rank costs bandwidth even for small adapters\n"
    )


def print_table(rows: dict[str, Result]) -> None:
    print("| system | decode tok/s | end-to-end tok/s | decode step ms | spread | other load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r.decode_tps:.1f} | {r.e2e_tps:.1f} | {r.step_ms:.1f} | {100 * r.spread:.0f}% "
              f"| {r.noise:.2f} |")  # fmt: skip
    print("(spread: (max - min) / median of decode tok/s over the timed runs; other load: cores that other "
          "processes kept busy during them, median; systems run interleaved, round by round)")  # fmt: skip


def print_checks(rows: dict[str, Result]) -> None:
    """Sanity, not a test: the adapters change outputs, and our tokens match HF's (both fp32 greedy)."""
    ours_base, ours_mixed, *hf = rows.values()
    batch = len(ours_base.tokens)
    differ = sum(a != b for a, b in zip(ours_base.tokens, ours_mixed.tokens, strict=True))
    print(f"\nchecks: adapters change the output of {differ}/{batch} requests", end="")
    if hf:
        same_base = sum(a == b for a, b in zip(ours_base.tokens, hf[0].tokens, strict=True))
        same_mixed = sum(a == b for a, b in zip(ours_mixed.tokens, hf[1].tokens, strict=True))
        print(f"; identical tokens to HF: base {same_base}/{batch}, mixed vs peft {same_mixed}/{batch}",
              end="")  # fmt: skip
        agree = [common_prefix(a, b) for a, b in zip(ours_base.tokens, hf[0].tokens, strict=True)]
        agree += [common_prefix(a, b) for a, b in zip(ours_mixed.tokens, hf[1].tokens, strict=True)]
        print(f"; greedy tokens before the first difference: mean {statistics.mean(agree):.1f} of "
              f"{len(ours_base.tokens[0])}", end="")  # fmt: skip
    print()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def print_ratios(rows: dict[str, Result]) -> None:
    ours_base, ours_mixed, *hf = rows.values()
    ratio = ours_mixed.decode_tps / ours_base.decode_tps
    print(f"ours mixed / ours base (decode): {ratio:.2f}   (target >= 0.9)")
    if hf:
        print(f"ours mixed / peft mixed (decode): {ours_mixed.decode_tps / hf[1].decode_tps:.1f}x   "
              f"(target >= 5x); end-to-end: {ours_mixed.e2e_tps / hf[1].e2e_tps:.1f}x")  # fmt: skip
        print(f"ours base / HF base (decode): {ours_base.decode_tps / hf[0].decode_tps:.1f}x")


def print_bandwidth(core: EngineCore, rows: dict[str, Result], args) -> None:
    ours_base, ours_mixed, *_ = rows.values()
    base_bytes, lora_bytes = decode_step_bytes(core, min(args.num_adapters, args.batch))
    print()
    cases = (("base ", ours_base, base_bytes), ("mixed", ours_mixed, base_bytes + lora_bytes))
    for label, r, nbytes in cases:
        print(f"bytes/decode step, {label}: {nbytes / 1e6:.0f} MB  ({r.step_ms:.1f} ms/step -> "
              f"{nbytes / r.step_ms / 1e6:.1f} GB/s achieved)")  # fmt: skip
    print(f"  (base weights {base_bytes / 1e6:.0f} MB, LM head counted once; LoRA {lora_bytes / 1e6:.0f} MB "
          f"= {min(args.num_adapters, args.batch)} slots x A+B at rank {args.max_lora_rank})")  # fmt: skip
    copy_gbs, read_gbs = memory_bandwidth_gbs()
    print(f"measured bandwidth on a 256 MiB fp32 tensor: copy {copy_gbs:.1f} GB/s (read + write), "
          f"read-only (sum) {read_gbs:.1f} GB/s")  # fmt: skip
    floor = base_bytes / (base_bytes + lora_bytes)
    print(f"bandwidth-bound ceiling of ours mixed / ours base: {floor:.2f} (= base bytes / mixed bytes)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    start = cpu_snapshot()
    core = build_engine(args)
    prompts = chat_prompts(core.tokenizer, args.batch)
    systems = engine_systems(core, prompts, args)
    if not args.skip_hf:
        systems.update(hf_systems(core, prompts, args))
    rows = time_interleaved(systems, args)
    print_header(args, core, prompts, other_load(start))
    print_table(rows)
    print_checks(rows)
    print_ratios(rows)
    print_bandwidth(core, rows, args)
    if args.profile:
        print_profile(core, prompts, args)


if __name__ == "__main__":
    main()
