"""The flood of issue 21: a small tenant's latency while a big one floods the server, fcfs vs fair.

Run:  .venv/bin/python bench/fairness.py
      .venv/bin/python bench/fairness.py --flood 40 --flood-tokens 32 --small 3 --small-tokens 8 --repeats 2

For each repeat and each policy (``--scheduling fcfs``, then ``fair``, the default) a fresh
``loraplex serve --max-num-seqs 4 --keys-file K`` is started, with one key for tenant A and one
for tenant B. A sends ``--flood`` greedy completions of ``--flood-tokens`` tokens at once; as soon
as the server reports A's backlog queued (``loraplex_scheduler_waiting_requests``), B sends
``--small`` completions of ``--small-tokens`` tokens. Printed per policy, over the repeats: B's
latency p50 / p99 / max (send → whole response), A's p50, the flood's wall time (A's first send to
the last response) and the total throughput (completion tokens / wall), with its ratio to fcfs.
No figure is asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from bench.serve import launched_server, percentile

POLICIES = ("fcfs", "fair")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="--model of the started servers")
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--flood", type=int, default=40, help="tenant A's requests")
    p.add_argument("--flood-tokens", type=int, default=32, help="tokens per A request (ignore_eos)")
    p.add_argument("--small", type=int, default=3, help="tenant B's requests")
    p.add_argument("--small-tokens", type=int, default=8, help="tokens per B request (ignore_eos)")
    p.add_argument("--repeats", type=int, default=2, help="floods per policy (policies alternate)")
    p.add_argument("--server-args", default="", help="more `loraplex serve` flags, one shell string")
    args = p.parse_args()
    args.adapter_prefix = "unused-"
    return args


async def complete(client: httpx.AsyncClient, key: str, max_tokens: int) -> tuple[float, float, int]:
    """(sent, done) perf_counter seconds and completion tokens of one greedy completion."""
    body = {"model": "base", "prompt": "Write a story about a lighthouse keeper.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    sent = time.perf_counter()
    response = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return sent, time.perf_counter(), response.json()["usage"]["completion_tokens"]


async def waiting(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("loraplex_scheduler_waiting_requests "):
            return float(line.split()[1])
    return 0.0


async def flood(url: str, keys: dict[str, str], args) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await complete(client, keys["a"], 2)  # warm up
        started = time.perf_counter()
        big = [
            asyncio.ensure_future(complete(client, keys["a"], args.flood_tokens)) for _ in range(args.flood)
        ]
        while await waiting(client) < args.flood - 2 * args.max_num_seqs:
            await asyncio.sleep(0.01)
        small = await asyncio.gather(
            *(complete(client, keys["b"], args.small_tokens) for _ in range(args.small))
        )
        big_done = await asyncio.gather(*big)
    wall = max(done for _, done, _ in (*big_done, *small)) - started
    tokens = sum(n for *_, n in (*big_done, *small))
    return {"b": [done - sent for sent, done, _ in small], "a": [done - sent for sent, done, _ in big_done],
            "wall": wall, "tokens": tokens}  # fmt: skip


def run(policy: str, keys_file: Path, keys: dict[str, str], args) -> dict[str, object]:
    flags = ["--served-model-name", "base", "--keys-file", str(keys_file), "--scheduling", policy,
             "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    with launched_server(args, [], flags) as server:
        args.command = server.command
        return asyncio.run(flood(server.url, keys, args))


def main() -> None:
    args = parse_args()
    from adapters.tenants import add_key  # imports torch: after the arguments are checked

    results: dict[str, list[dict[str, object]]] = {policy: [] for policy in POLICIES}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-fairness-") as tmp:
        keys_file = Path(tmp) / "keys.json"
        keys = {tenant: add_key(keys_file, tenant) for tenant in ("a", "b")}
        for _ in range(args.repeats):
            for policy in POLICIES:
                results[policy].append(run(policy, keys_file, keys, args))
    report(args, results)


def report(args, results: dict[str, list[dict[str, object]]]) -> None:
    print(f"# bench/fairness.py on {cpu_name()}: {args.flood} x {args.flood_tokens} tokens from A, "
          f"{args.small} x {args.small_tokens} from B, --max-num-seqs {args.max_num_seqs}, "
          f"{args.repeats} repeat(s)")  # fmt: skip
    print(f"# {args.command}")
    print("| scheduling | B p50 s | B p99 s | B max s | A p50 s | flood wall s | tok/s | tok/s vs fcfs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    baseline = None
    for policy, runs in results.items():
        b = [s for r in runs for s in r["b"]]  # type: ignore[union-attr]
        a = [s for r in runs for s in r["a"]]  # type: ignore[union-attr]
        wall = sum(r["wall"] for r in runs)  # type: ignore[misc]
        rate = sum(r["tokens"] for r in runs) / wall  # type: ignore[misc]
        baseline = baseline or rate
        cells = [percentile(b, 50), percentile(b, 99), max(b), percentile(a, 50), wall / len(runs)]
        print(f"| {policy} | {' | '.join(f'{c:.2f}' for c in cells)} | {rate:.1f} | {rate / baseline:.3f} |")


if __name__ == "__main__":
    main()
