"""Concurrency sweep: how the server holds up as more clients keep it busy (issue 14).

Run:  .venv/bin/python bench/load.py                      (starts `loraplex serve` with defaults)
      .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --server-pid PID
      .venv/bin/python bench/load.py --levels 1,4,16,64 --duration 60 --server-args "--max-queue 32"

At each level C, C clients each send streamed chat completions back to back (a closed loop; after
a 429 a client waits the 1 s Retry-After) for --duration seconds, on the base model and the bench
adapters in turn (request i names model
i mod M). Printed per level: requests ok and failed (by status, e.g. 429 when the queue is full),
output tok/s (completion tokens of the successful requests / the level's wall time, whose last
requests end a little after --duration), TTFT and inter-token latency p50/p99 of the successful
ones, and the server's RSS before and after the level (from /proc, so only for a server on this
machine: the one started here or --server-pid).
Without --url the server is started as a user starts it: ``loraplex serve --model M`` with one
``--adapter`` per bench adapter and --server-args, nothing tuned. No figure here is asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from bench.serve import Outcome, bench_adapters, latencies, launched_server, percentile, send, served_models

RETRY_AFTER_S = 1.0  # what the server's 429 and 503 answers say


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--server-pid", type=int, default=None, help="its process id, for RSS (with --url)")
    p.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (ignore_eos)")
    p.add_argument("--num-adapters", type=int, default=4, help="bench adapters the requests rotate over")
    p.add_argument("--model", default="smollm2-135m-instruct", help="--model of the started server")
    p.add_argument("--rank", type=int, default=16, help="rank of the bench adapters")
    p.add_argument("--server-args", default="", help="more `loraplex serve` flags, one shell string")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    args = p.parse_args()
    args.adapter_prefix, args.endpoint, args.ignore_eos = "bench-adapter-", "chat", True
    args.levels = [int(x) for x in args.levels.split(",")]
    return args


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def client_loop(client, args, models: list[str], start_index: int, stop_at: float, out: list) -> None:
    """Send requests back to back until ``stop_at``; each finished one goes into ``out``. After a 429
    or 503 the client waits the server's Retry-After (1 s) before its next request, as the OpenAI
    SDK and loraplex's client do."""
    i = start_index
    while time.perf_counter() < stop_at:
        model = models[i % len(models)]
        outcome = await send(client, args, model, f"Tell me about the number {i}.", args.max_tokens)
        out.append(outcome)
        i += 1
        if outcome.status in ("429", "503"):
            await asyncio.sleep(RETRY_AFTER_S)


async def one_level(client, args, models: list[str], concurrency: int) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    stop_at = start + args.duration
    await asyncio.gather(
        *(client_loop(client, args, models, k, stop_at, outcomes) for k in range(concurrency))
    )
    return outcomes, time.perf_counter() - start


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


async def sweep(args, url: str, pid: int | None) -> None:
    limits = httpx.Limits(
        max_connections=max(args.levels) + 8, max_keepalive_connections=max(args.levels) + 8
    )
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        served = await served_models(client)
        models = [served[0], *(m for m in served[1:] if m.startswith(args.adapter_prefix))]
        await asyncio.gather(*(send(client, args, m, "Hello", 2) for m in models))  # adapters resident
        print(f"server: {url}; models: {', '.join(models)}; machine: {cpu_name()}")
        columns = ("clients", "ok", "failed", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                   "ITL p99 ms", "RSS before MB", "RSS after MB")  # fmt: skip
        print("| " + " | ".join(columns) + " |\n|" + " ---: |" * len(columns))
        for level in args.levels:
            before = rss_mb(pid)
            outcomes, wall = await one_level(client, args, models, level)
            after = rss_mb(pid)
            ok = [o for o in outcomes if o.status == "ok"]
            failed = collections.Counter(o.status for o in outcomes if o.status != "ok")
            lat = latencies(ok)
            tokens = sum(o.completion_tokens for o in ok)
            ttft, itl = lat["TTFT ms"], lat["ITL ms"]
            failures = ", ".join(f"{n} {status}" for status, n in failed.most_common()) or "0"
            cells = (level, len(ok), failures, f"{tokens / wall:.1f}", fmt(percentile(ttft, 50)),
                     fmt(percentile(ttft, 99)), fmt(percentile(itl, 50), 1), fmt(percentile(itl, 99), 1),
                     fmt(before), fmt(after))  # fmt: skip
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main() -> None:
    args = parse_args()
    if args.url is not None:
        asyncio.run(sweep(args, args.url.rstrip("/"), args.server_pid))
        return
    with launched_server(args, bench_adapters(args), []) as server:
        print(f"command: {server.command}")
        asyncio.run(sweep(args, server.url, server.process.pid))


if __name__ == "__main__":
    main()
