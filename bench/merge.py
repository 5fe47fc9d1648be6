"""Merged copies of hot adapters: speed against the base model and against side paths only.

Run:  .venv/bin/python bench/merge.py          (SmolLM2-135M fp32, batch 8, rank-16 adapters on all
                                               seven projections, 32 new tokens, median of 9 rounds)

(a) All traffic on one adapter, batch B: decode tok/s of the base model alone, of the adapter on
    the side path, and of the adapter served from its merged copy (operator merge). Target:
    merged ≥ 0.97 × base.
(b) Mixed traffic, 80 % on one adapter and 20 % spread over 16 others, requests arriving as the
    batch frees room (closed loop, --num-requests in total): throughput with --merge-policy auto
    against off, and the p99 inter-token latency of the minority adapters' requests. ITL is the
    wall time between a request's consecutive tokens, measured at each engine step.
Systems run interleaved round by round, in a rotated order; figures are medians over --repeats
rounds, and ratios are medians of each round's own ratio (a shared 2-core machine drifts by ±20 %
between minutes, so only runs next to each other compare). Engine steps
are driven synchronously in this process (no HTTP), like bench/engine.py. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import adapter_dirs, chat_prompts, cpu_name, cpu_snapshot, other_load
from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.engine.merging import CopyState
from server.engine.sampler import SamplingParams
from server.model.factory import load_model

NUM_MINORITY = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=80, help="requests in the mixed run (b)")
    parser.add_argument("--hot-share", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=9, help="rounds of (a)")
    parser.add_argument("--mixed-repeats", type=int, default=3, help="rounds of (b)")
    return parser.parse_args()


def build_core(args, loaded, merge_policy: str) -> EngineCore:
    config = EngineConfig(
        max_loras=8, max_lora_rank=args.rank, max_num_seqs=args.batch,
        max_num_batched_tokens=max(2048, args.batch * 256), merge_policy=merge_policy,
    )  # fmt: skip
    core = EngineCore(loaded, config)
    for i, path in enumerate(adapter_dirs(loaded.checkpoint.path, 1 + NUM_MINORITY, args.rank)):
        core.add_adapter(f"a{i}", path)
    return core


def sampling(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)


def decode_tok_s(core: EngineCore, prompts, adapter: str | None, args) -> float:
    """Decode tok/s of one batch on one adapter (timed after every request has its first token)."""
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, sampling(args), adapter)
    while any(not s.output_token_ids for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    start = time.perf_counter()
    while core.has_work:
        core.step()
    return len(prompts) * (args.new_tokens - 1) / (time.perf_counter() - start)


def merge_now(core: EngineCore, adapter: str) -> None:
    copy = core.merges.merge(adapter)
    while copy.state is CopyState.BUILDING:
        time.sleep(0.01)
        core.merges.poll()


def mixed_run(core: EngineCore, prompts, args, seed: int) -> tuple[float, list[float], int]:
    """(generated tok/s, ITLs of minority requests in s, tokens served merged) of the mixed run."""
    rng = random.Random(seed)
    names = [
        "a0" if rng.random() < args.hot_share else f"a{rng.randint(1, NUM_MINORITY)}"
        for _ in range(args.num_requests)
    ]
    merged_before, last_token_s, itls, next_request = core.merges.stats.tokens_merged, {}, [], 0
    start = time.perf_counter()
    while next_request < len(names) or core.has_work:
        in_flight = len(core.scheduler.running) + len(core.scheduler.waiting)
        while next_request < len(names) and in_flight < args.batch:
            rid = f"m{next_request}"
            core.add_request(rid, prompts[next_request % len(prompts)], sampling(args), names[next_request])
            next_request, in_flight = next_request + 1, in_flight + 1
        for delta in core.step():
            now = time.perf_counter()
            if delta.request_id in last_token_s and names[int(delta.request_id[1:])] != "a0":
                itls.append(now - last_token_s[delta.request_id])
            last_token_s[delta.request_id] = now
    elapsed = time.perf_counter() - start
    return (
        args.num_requests * args.new_tokens / elapsed,
        itls,
        core.merges.stats.tokens_merged - merged_before,
    )


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def part_a(args, loaded, prompts) -> dict[str, list[float]]:
    """tok/s per system per round. The copy is built once, before timing: building it and
    returning memory after an unmerge are not part of the decode speed being compared. Each round
    runs the three systems in a rotated order, so drift on a shared machine is spread evenly."""
    core = build_core(args, loaded, merge_policy="off")
    systems = {"base": None, "side path": "a1", "merged": "a0"}  # a0 merged; a1 served on its side path
    decode_tok_s(core, prompts, "a1", args)  # warm-up, and a1 in a slot
    merge_now(core, "a0")
    decode_tok_s(core, prompts, "a0", args)  # warm-up of the copy
    results: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for round_ in range(args.repeats):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            results[name].append(decode_tok_s(core, prompts, systems[name], args))
    return results


def part_b(args, loaded, prompts) -> dict[str, list[tuple[float, list[float], int]]]:
    cores = {policy: build_core(args, loaded, policy) for policy in ("off", "auto")}
    results: dict[str, list] = {"off": [], "auto": []}
    for round_ in range(args.mixed_repeats):
        for policy, core in cores.items():
            results[policy].append(mixed_run(core, prompts, args, seed=round_))
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    loaded = load_model(ModelConfig(model=args.model, dtype="float32", device="cpu"), EngineConfig())
    prompts = chat_prompts(loaded.checkpoint.tokenizer, args.batch)
    since = cpu_snapshot()
    print(f"$ {shlex.join(['.venv/bin/python', *sys.argv])}")
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"other processes kept {other_load(since):.2f} cores busy")  # fmt: skip
    print(f"setting: {args.model} fp32, batch {args.batch}, rank {args.rank} on all 7 projections, "
          f"{args.new_tokens} new tokens, medians of {args.repeats} rounds (a), "
          f"{args.mixed_repeats} (b)")  # fmt: skip
    a = part_a(args, loaded, prompts)
    print("\n(a) all traffic on one adapter: decode tok/s (x base: median over rounds of the ratio to the")
    print("    base run of the same round)")
    for name, samples in a.items():
        ratio = statistics.median(x / b for x, b in zip(samples, a["base"], strict=True))
        runs = [round(x, 1) for x in samples]
        print(f"  {name:10s} {statistics.median(samples):7.1f} tok/s   {ratio:5.2f}x base   runs {runs}")
    print(f"\n(b) {args.hot_share:.0%} of {args.num_requests} requests on one adapter, the rest over "
          f"{NUM_MINORITY} others (closed loop, batch {args.batch})")  # fmt: skip
    sys.stdout.flush()
    b = part_b(args, loaded, prompts)
    off = statistics.median(r[0] for r in b["off"])
    for policy, runs in b.items():
        tok_s = statistics.median(r[0] for r in runs)
        itl = statistics.median(p99(r[1]) for r in runs) * 1e3
        merged = statistics.median(r[2] for r in runs)
        print(f"  merge-policy {policy:4s} {tok_s:7.1f} tok/s  {tok_s / off:5.2f}x off   "
              f"minority p99 ITL {itl:6.1f} ms   tokens served merged {merged:.0f}")  # fmt: skip
    print(f"other processes kept {other_load(since):.2f} cores busy during the whole run")


if __name__ == "__main__":
    main()
