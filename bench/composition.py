"""Per-request adapter composition through the real server (issue 18).

Run:  .venv/bin/python bench/composition.py                 (about 2 minutes on 2 cores)

Starts ``loraplex serve`` with its defaults (the embedded SmolLM2-135M) and --num-adapters random
rank-16 peft adapters on all seven projections (bench/engine.py's, cached), then measures:

1. time to first token (a streamed completion, 1 token) for a composition the server has not built
   yet (new weights each round: a new content key) and for the same one again (cached), per
   combination method, beside the plain adapter and the base model;
2. decode throughput of --concurrency streamed completions of --max-tokens tokens sent at once:
   each a different plain adapter, each a different (cached) composition, and half and half.

Prints tables to paste into docs/benchmarks.md; nothing here is asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from bench.serve import bench_adapters, launched_server

PROMPT = "Write one sentence about the sea."
METHODS = {  # combination → its parameters
    "cat": {}, "linear": {}, "svd": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--adapter-prefix", default="bench-adapter-")
    p.add_argument("--server-args", default="")
    p.add_argument("--rounds", type=int, default=3, help="new compositions timed per method")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    return p.parse_args()


def ttft_s(client: httpx.Client, body: dict) -> float:
    """Seconds from sending a streamed completion to its first chunk with text."""
    started = time.perf_counter()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            sys.exit(f"{response.status_code}: {response.text}")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - started
    raise RuntimeError("no chunk")


def composition(adapters: list[str], method: str, weight: float) -> dict:
    return {"adapters": [{"name": a, "weight": weight} for a in adapters], "combination": method,
            **METHODS[method]}  # fmt: skip


def ttft_table(
    client: httpx.Client, base: str, names: list[str], rounds: int
) -> list[tuple[str, float, float]]:
    """(what, new-or-only ms, cached ms) per row; medians over ``rounds``."""
    one = {"model": base, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    rows = [("base model", statistics.median(ttft_s(client, one) for _ in range(rounds)), float("nan"))]
    rows.append(("plain adapter", statistics.median(ttft_s(client, {**one, "model": names[0]})
                                                    for _ in range(rounds)), float("nan")))  # fmt: skip
    for method in METHODS:
        new, cached = [], []
        for r in range(rounds):
            body = {**one, **composition(names[:2], method, 0.5 + 0.001 * r + 0.01 * len(rows))}
            new.append(ttft_s(client, body))
            cached.append(ttft_s(client, body))
        rows.append((f"{method} of 2", statistics.median(new), statistics.median(cached)))
    return rows


async def throughput(url: str, bodies: list[dict], max_tokens: int) -> float:
    """Generated tokens per second with ``bodies`` streamed at once (each exactly max_tokens)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(body: dict) -> int:
            full = {**body, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=full) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(b) for b in bodies))
        return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    adapters = bench_adapters(args)
    names = [f"{args.adapter_prefix}{k}" for k in range(len(adapters))]
    with launched_server(args, adapters, []) as server:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            base = client.get("/v1/models").json()["data"][0]["id"]
            rows = ttft_table(client, base, names, args.rounds)
            n = args.concurrency
            plain = [{"model": names[i % len(names)]} for i in range(n)]
            composed = [{"model": base, **composition([names[i % len(names)], names[(i + 1) % len(names)]],
                                                      "linear", 0.7)} for i in range(n)]  # fmt: skip
            mixed = [plain[i] if i % 2 else composed[i] for i in range(n)]
            for body in composed:  # built before the timing: the throughput is of cached compositions
                ttft_s(client, {**body, "prompt": PROMPT, "max_tokens": 1})
        runs = {label: asyncio.run(throughput(server.url, bodies, args.max_tokens))
                for label, bodies in (("plain", plain), ("composed", composed), ("mixed", mixed),
                                      ("plain (again)", plain))}  # fmt: skip
        print(f"machine: {cpu_name()}; {server.command}")
        print(f"{len(adapters)} rank-{args.rank} adapters on all 7 projections; TTFT median of {args.rounds}")
        print("\n| request | TTFT new ms | TTFT cached ms |\n| --- | ---: | ---: |")
        for what, new, cached in rows:
            print(f"| {what} | {new * 1000:.0f} | {'—' if cached != cached else f'{cached * 1000:.0f}'} |")
        print(f"\n{n} concurrent streams of {args.max_tokens} tokens (compositions: linear of 2 adapters)")
        print("| streams | tok/s |\n| --- | ---: |")
        for label, rate in runs.items():
            print(f"| {label} | {rate:.1f} |")


if __name__ == "__main__":
    main()
