"""Prefix caching through the real server (issue 20): repeated long prompts and shared system prompts.

Run:  .venv/bin/python bench/prefix.py                 (about 3 minutes on 2 cores)

Starts ``loraplex serve`` with its defaults (the embedded SmolLM2-135M, prefix caching on), then
again with ``--prefix-caching off`` (the baseline, in the same run), and measures on each:

1. time to first token (a streamed completion, 1 token) of a --prompt-tokens long prompt never
   seen before (cold: each round's prompt starts with words of its own) and of the same prompt sent
   again (warm); median over --rounds;
2. chat throughput: --chats chat completions of --max-tokens tokens, --concurrency at a time, each
   with the same --system-tokens system prompt and a question of its own; generated tokens/s,
   TTFT p50, and the prefix cache's hit rate over the run (``vllm:prefix_cache_hits`` /
   ``vllm:prefix_cache_queries`` from ``/metrics``).

Prints tables to paste into docs/benchmarks.md; nothing here is asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.composition import ttft_s
from bench.machine import cpu_name
from bench.serve import launched_server, percentile, random_prompt


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter-prefix", default="bench-adapter-")
    p.add_argument("--server-args", default="", help="extra `loraplex serve` flags, both servers")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--system-tokens", type=int, default=600)
    p.add_argument("--chats", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args()


def sized_prompt(client: httpx.Client, base: str, rng: random.Random, num_tokens: int) -> str:
    """A prompt of about ``num_tokens`` tokens of the served model (counted by the server)."""
    words = num_tokens
    for _ in range(4):
        text = random_prompt(rng, words)
        body = {"model": base, "prompt": text, "max_tokens": 1}
        counted = client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
        if abs(counted - num_tokens) <= 8:
            break
        words = max(8, round(words * num_tokens / counted))
    return text


def ttft_rows(client: httpx.Client, base: str, args) -> tuple[float, float, int]:
    """(cold median s, warm median s, prompt tokens): each round a prompt of its own, then again."""
    rng = random.Random(0)
    cold, warm = [], []
    prompt = sized_prompt(client, base, rng, args.prompt_tokens)
    body = {"model": base, "max_tokens": 1, "temperature": 0}
    for r in range(args.rounds):
        fresh = f"Round {r} {random_prompt(rng, 4)} {prompt}"  # a first block no request had
        cold.append(ttft_s(client, {**body, "prompt": fresh}))
        warm.append(ttft_s(client, {**body, "prompt": fresh}))
    tokens = client.post("/v1/completions", json={**body, "prompt": fresh}).json()["usage"]["prompt_tokens"]
    return statistics.median(cold), statistics.median(warm), tokens


def prefix_counters(client: httpx.Client) -> tuple[float, float]:
    """(queried tokens, hit tokens) since start, from ``/metrics``."""
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                found[sample.name] = sample.value
    return found.get("vllm:prefix_cache_queries_total", 0.0), found.get("vllm:prefix_cache_hits_total", 0.0)


async def chat_run(url: str, base: str, system: str, args) -> tuple[float, float]:
    """(generated tokens/s, TTFT p50 ms) of --chats chats, --concurrency at a time."""
    gate = asyncio.Semaphore(args.concurrency)
    rng = random.Random(1)
    questions = [random_prompt(rng, 12) for _ in range(args.chats)]
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(question: str) -> int:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            body = {
                "model": base,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            tokens, first_seen = 0, False
            async with gate:
                started = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if (
                            not first_seen
                            and chunk.get("choices")
                            and chunk["choices"][0]["delta"].get("content")
                        ):
                            ttfts.append(time.perf_counter() - started)
                            first_seen = True
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            return tokens

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(q) for q in questions))
        return sum(counts) / (time.perf_counter() - started), percentile(ttfts, 50) * 1000


@dataclass(frozen=True)
class Run:
    command: str
    cold_s: float
    warm_s: float
    prompt_tokens: int
    chat_tokens_per_s: float
    chat_ttft_ms: float
    hit_rate: float | None  # over the chats


def measure(args, flags: list[str]) -> Run:
    with launched_server(args, [], flags) as server:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            base = client.get("/v1/models").json()["data"][0]["id"]
            cold, warm, tokens = ttft_rows(client, base, args)
            system = sized_prompt(client, base, random.Random(2), args.system_tokens)
            before = prefix_counters(client)
            rate, ttft_ms = asyncio.run(chat_run(server.url, base, system, args))
            after = prefix_counters(client)
        queries, hits = after[0] - before[0], after[1] - before[1]
        return Run(server.command, cold, warm, tokens, rate, ttft_ms, hits / queries if queries else None)


def main() -> None:
    args = parse_args()
    runs = {"on": measure(args, []), "off": measure(args, ["--prefix-caching", "off"])}
    print(f"machine: {cpu_name()}; {runs['on'].command} (and the same with --prefix-caching off)")
    print(f"\nTTFT of a {runs['on'].prompt_tokens}-token prompt (streamed, 1 token), median of {args.rounds}")
    print("| prefix caching | cold ms | warm (same prompt again) ms | cold / warm |")
    print("| --- | ---: | ---: | ---: |")
    for label, run in runs.items():
        ratio = run.cold_s / run.warm_s
        print(f"| {label} | {run.cold_s * 1000:.0f} | {run.warm_s * 1000:.0f} | {ratio:.1f}x |")
    shape = f"{args.chats} chats, {args.concurrency} at a time, {args.max_tokens} tokens each"
    print(f"\n{shape}, all with one {args.system_tokens}-token system prompt")
    print("| prefix caching | tok/s | TTFT p50 ms | hit rate |\n| --- | ---: | ---: | ---: |")
    for label, run in runs.items():
        shown = "—" if run.hit_rate is None else f"{run.hit_rate * 100:.1f} %"
        print(f"| {label} | {run.chat_tokens_per_s:.1f} | {run.chat_ttft_ms:.0f} | {shown} |")


if __name__ == "__main__":
    main()
