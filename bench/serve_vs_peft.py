"""Issue 12: `loraplex serve` as a user starts it, N requests over N distinct adapters, vs HF peft.

Run:  .venv/bin/python bench/serve.py --vs-peft
          (the issue's setting: smollm2-135m-instruct, 8 concurrent requests over 8 distinct rank-16
           adapters, 32 tokens each, 5 rounds after a warm-up; about 2 min on 2 cores)
      .venv/bin/python bench/serve.py --vs-peft --rounds 1 --skip-peft     (the server's two figures)
      .venv/bin/python bench/serve.py --vs-peft --concurrency 32          (32 requests, 32 adapters)
      .venv/bin/python bench/serve_vs_peft.py --rounds 3                  (the same script, directly)

The server is started with default settings: ``loraplex serve --model M --port P --data-dir TMP``,
one ``--adapter bench-adapter-<k>=DIR`` per adapter and nothing else but --server-args (no tuning
flag: what the engine picks for itself is what is measured). The adapters are bench/engine.py's
random peft LoRAs on all seven projections (cached under ~/.cache/loraplex/bench-adapters).

Three systems, the same N prompts (bench/engine.py's QUESTIONS, question i for request i):
  mixed: N streamed /v1/chat/completions requests sent at once (a closed batch), request i naming
         bench-adapter-<i>; temperature 0, ignore_eos, max_tokens --max-tokens;
  base:  the same batch with every request naming the base model (the server's first /v1/models id);
  peft:  in this process, one fp32 PeftModel holding the same N adapters, ``generate(adapter_names=
         [...])`` on the left-padded, chat-templated batch (bench/peft_baseline.py), torch threads =
         all cores, while the server is up but gets no requests.
Throughput = completion tokens (the server's usage chunks; peft: N x --max-tokens) / (first send ->
last [DONE]; peft: the generate call). One warm-up batch of each system, then --rounds rounds that
run mixed, base and peft once each (interleaved, so a burst of load from other processes spreads
over all three); median, min, max and spread ((max - min) / median) per system. Targets (issue 12):
mixed / peft >= 5x and mixed / base >= 0.7.

Batch-1 latency (--no-batch-latency skips it): after the rounds, one streamed request at a time,
--rounds times each for base and for bench-adapter-0; TPOT = (last - first text chunk) /
(completion tokens - 1), client side, median.

Also printed: the machine (CPU model, family/model, SIMD/AMX flags), versions, the server's command
and its log lines that mention tuning, kernel or dtype (the engine's "cpu tuning:" line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from bench.serve import (
    Launched,
    bench_adapters,
    cpu_snapshot,
    launched_server,
    machine_load,
    send,
    served_models,
)

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
LOG_WORDS = ("tuning", "kernel", "dtype")
KEEPALIVE_S = 4.0  # below uvicorn's 5 s keep-alive, so the client never reuses a connection it closed
TARGETS = {"mixed / peft": 5.0, "mixed / base": 0.7}
System = Callable[[], Awaitable["Batch"]]  # one timed batch of one system


@dataclass(frozen=True)
class Batch:
    """One closed batch of one system."""

    tokens: int
    wall_s: float
    texts: list[str]
    prompt_tokens: list[int]  # server: from usage; peft: the prompt ids' lengths
    busy: float | None  # cores busy machine-wide meanwhile (all processes)
    server_cpu_s: float | None = None  # peft only: CPU seconds the idle server used meanwhile

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/serve.py --vs-peft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m-instruct", help="--model of the started server")
    p.add_argument("--concurrency", type=int, default=8, help="N: requests per batch = distinct adapters")
    p.add_argument("--rank", type=int, default=16, help="rank of the generated peft adapters")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each: mixed, base, peft)")
    p.add_argument("--skip-peft", action="store_true", help="no peft baseline (the server's figures only)")
    p.add_argument("--batch-latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure batch-1 TPOT for base and one adapter after the rounds")  # fmt: skip
    p.add_argument("--server-args", default="", help="`loraplex serve` flags to add, one shell string")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.rounds < 1 or args.max_tokens < 2:
        p.error("need --concurrency >= 1, --rounds >= 1 and --max-tokens >= 2")
    # what bench/serve.py's helpers read: the adapters, their names, the request bodies
    args.num_adapters, args.adapter_prefix, args.endpoint, args.ignore_eos = (
        args.concurrency, "bench-adapter-", "chat", True,
    )  # fmt: skip
    return args


# ---- the systems ----


async def server_batch(client: httpx.AsyncClient, args, models: list[str]) -> Batch:
    """Request i asks question i of ``models[i]``; all sent at once; exits if any fails."""
    from bench.peft_baseline import questions

    since = cpu_snapshot()
    pairs = zip(models, questions(len(models)), strict=True)
    jobs = [send(client, args, model, question, args.max_tokens) for model, question in pairs]
    outcomes = await asyncio.gather(*jobs)
    busy = machine_load(since)
    failed = [f"{o.model}: {o.status} {o.error!r}" for o in outcomes if o.status != "ok"]
    if failed:
        sys.exit("requests failed:\n  " + "\n  ".join(failed))
    wall_s = max(o.done_s for o in outcomes) - min(o.sent_s for o in outcomes)
    tokens = sum(o.completion_tokens for o in outcomes)
    return Batch(tokens, wall_s, [o.text for o in outcomes], [o.prompt_tokens for o in outcomes], busy)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def peft_batch(peft, args, server_pid: int) -> Batch:
    """One timed peft generate (blocking: nothing else is in flight), and what the server did meanwhile."""
    since, server_since = cpu_snapshot(), process_cpu_s(server_pid)
    run = peft.generate()
    busy, server_cpu_s = machine_load(since), process_cpu_s(server_pid) - server_since
    tokens = args.concurrency * args.max_tokens
    return Batch(tokens, run.total_s, peft.texts(run), [len(p) for p in peft.prompts], busy, server_cpu_s)


def systems(args, client, base_model: str, peft, server_pid: int) -> dict[str, System]:
    adapters = [f"{args.adapter_prefix}{k}" for k in range(args.concurrency)]
    named = {
        "mixed": lambda: server_batch(client, args, adapters),
        "base": lambda: server_batch(client, args, [base_model] * args.concurrency),
    }
    if peft is not None:
        named["peft"] = lambda: peft_batch(peft, args, server_pid)
    return named


# ---- the run ----


async def interleaved(named: dict[str, System], rounds: int) -> dict[str, list[Batch]]:
    """One warm-up batch of each system, then ``rounds`` rounds running each system once."""
    for fn in named.values():
        await fn()
    batches: dict[str, list[Batch]] = {name: [] for name in named}
    for r in range(rounds):
        for name, fn in named.items():
            batches[name].append(await fn())
        print(f"(round {r + 1}/{rounds}: " + ", ".join(f"{n} {b[-1].tps:.1f}" for n, b in batches.items())
              + " tok/s)", file=sys.stderr)  # fmt: skip
    return batches


async def batch1_tpot(client, args, model: str) -> tuple[float, float]:
    """(median TPOT ms, median TTFT ms) of --rounds single streamed requests, one at a time."""
    from bench.peft_baseline import questions

    tpot, ttft = [], []
    for _ in range(args.rounds):
        o = await send(client, args, model, questions(1)[0], args.max_tokens)
        if o.status != "ok" or o.completion_tokens < 2:
            sys.exit(f"batch-1 request to {model} failed: {o.status} {o.error!r}")
        tpot.append(1e3 * (o.chunk_s[-1] - o.chunk_s[0]) / (o.completion_tokens - 1))
        ttft.append(1e3 * (o.chunk_s[0] - o.sent_s))
    return statistics.median(tpot), statistics.median(ttft)


async def measure(args, server: Launched, peft) -> tuple[str, dict[str, list[Batch]], dict]:
    """(base model name, batches per system, batch-1 latency per model) against the started server."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_S)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        base_model = (await served_models(client))[0]
        named = systems(args, client, base_model, peft, server.process.pid)
        batches = await interleaved(named, args.rounds)
        latency = {}
        if args.batch_latency:
            for model in (base_model, f"{args.adapter_prefix}0"):
                latency[model] = await batch1_tpot(client, args, model)
    return base_model, batches, latency


def server_log_lines(log_path: Path) -> list[str]:
    """The server's log lines that mention tuning, kernel or dtype (the engine's "cpu tuning:" line)."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(word in line.lower() for word in LOG_WORDS)]


# ---- report ----


def cpu_details() -> str:
    """CPU model name, family/model and which of CPU_FLAGS it has, from /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    has = " ".join(f for f in CPU_FLAGS if f in flags) or "none"
    missing = " ".join(f for f in CPU_FLAGS if f not in flags) or "none"
    return (f"{cpu_name()}, cpu family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
            f"{os.cpu_count()} cores; flags: {has} (absent: {missing})")  # fmt: skip


def print_header(args, server: Launched, log_lines: list[str], batches: dict[str, list[Batch]]) -> None:
    import torch
    import transformers

    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}")
    print(f"machine: {cpu_details()}, {platform.system()} {platform.machine()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft_version()}, httpx {httpx.__version__}")  # fmt: skip
    print(f"server: {server.command}")
    print("  (default settings: only --adapter flags and --server-args; shares the cores with this client)")
    print("server log, lines with tuning/kernel/dtype:" + "".join(f"\n  {line}" for line in log_lines)
          + ("" if log_lines else " (none)"))  # fmt: skip
    lens = sorted(batches["mixed"][0].prompt_tokens)
    peft = f"peft fp32, in-process, torch threads {torch.get_num_threads()}, server idle"
    peft = peft if "peft" in batches else "peft skipped"
    print(f"setting: {args.model}, {args.concurrency} concurrent streamed /v1/chat/completions requests "
          f"(closed batch), each on a different rank-{args.rank} adapter on all seven projections; "
          f"temperature 0, ignore_eos, max_tokens {args.max_tokens}; prompts {lens[0]}-{lens[-1]} tokens; "
          f"{args.rounds} round(s) after 1 warm-up, interleaved ({'/'.join(batches)}); {peft}\n")  # fmt: skip


def peft_version() -> str:
    try:
        import peft
    except ImportError:
        return "not installed"
    return peft.__version__


LABELS = {"mixed": "loraplex serve, {n} adapters mixed", "base": "loraplex serve, base model only",
          "peft": "HF peft fp32 in-process, {n} adapters mixed"}  # fmt: skip


def print_table(args, batches: dict[str, list[Batch]]) -> dict[str, float]:
    """The throughput table; returns the median tok/s per system."""
    print("| system | tok/s (median) | min | max | spread | busy cores (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, runs in batches.items():
        tps = [b.tps for b in runs]
        mid = medians[name] = statistics.median(tps)
        busy = [b.busy for b in runs if b.busy is not None]
        busy_cell = f"{statistics.median(busy):.2f}" if busy else "?"
        print(f"| {LABELS[name].format(n=args.concurrency)} | {mid:.1f} | {min(tps):.1f} | {max(tps):.1f} "
              f"| {100 * (max(tps) - min(tps)) / mid:.0f}% | {busy_cell} |")  # fmt: skip
    print("(tok/s: completion tokens / (first send -> last [DONE]), peft: N x max_tokens / generate call; "
          "spread: (max - min) / median; busy cores: all processes, of "
          f"{os.cpu_count()})\n")  # fmt: skip
    return medians


def print_ratios(medians: dict[str, float]) -> None:
    ratios = {"mixed / base": medians["mixed"] / medians["base"]}
    if "peft" in medians:
        ratios = {"mixed / peft": medians["mixed"] / medians["peft"], **ratios}
    for name, value in ratios.items():
        target = TARGETS[name]
        verdict = "met" if value >= target else "NOT met"
        print(f"{name}: {value:.2f}x   (target >= {target:g}x: {verdict})")


def print_checks(batches: dict[str, list[Batch]]) -> None:
    """Sanity, not a test: adapters change the text; the server's prompts are peft's; the server idled."""
    mixed, base = batches["mixed"][-1], batches["base"][-1]
    n = len(mixed.texts)
    differ = sum(a != b for a, b in zip(mixed.texts, base.texts, strict=True))
    print(f"\nchecks: adapters change the text of {differ}/{n} requests (mixed vs base)", end="")
    if "peft" in batches:
        peft = batches["peft"][-1]
        same = sum(a == b for a, b in zip(mixed.texts, peft.texts, strict=True))
        prompts_match = "yes" if mixed.prompt_tokens == peft.prompt_tokens else "NO"
        idle = sum(b.server_cpu_s or 0.0 for b in batches["peft"])
        wall = sum(b.wall_s for b in batches["peft"])
        print(f"; identical text to peft {same}/{n} (information: greedy flips where the two round "
              f"differently or the server picks another dtype); server prompt lengths = peft's: "
              f"{prompts_match}\n"
              f"server CPU during the timed peft batches: {idle:.2f} s in {wall:.1f} s (idle check)",
              end="")  # fmt: skip
    print()


def print_latency(latency: dict[str, tuple[float, float]], base_model: str) -> None:
    if not latency:
        return
    print("\nbatch-1 latency (one streamed request at a time, client side, median):")
    for model, (tpot, ttft) in latency.items():
        label = "base" if model == base_model else f"adapter {model}"
        print(f"  {label}: TPOT {tpot:.1f} ms/token, TTFT {ttft:.0f} ms")
    (base_tpot, _), (lora_tpot, _) = latency.values()
    print(f"  adapter / base TPOT: {lora_tpot / base_tpot:.2f}")


# ---- main ----


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    adapters = bench_adapters(args)  # made (once, cached) before peft and the server read them
    peft = None
    if not args.skip_peft:
        from bench.peft_baseline import load_peft

        peft = load_peft(args.model, args.concurrency, args.rank, args.max_tokens)
    with launched_server(args, adapters, []) as server:
        try:
            base_model, batches, latency = asyncio.run(measure(args, server, peft))
        except SystemExit:
            tail = server.log_path.read_text(errors="replace")[-4000:]
            print(f"server log (tail):\n{tail}", file=sys.stderr)
            raise
        log_lines = server_log_lines(server.log_path)
        print_header(args, server, log_lines, batches)
    print_ratios(print_table(args, batches))
    print_checks(batches)
    print_latency(latency, base_model)


if __name__ == "__main__":
    main()
