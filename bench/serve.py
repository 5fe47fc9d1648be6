"""Load test of a loraplex server over HTTP: Poisson arrivals, Zipf-popular adapters, streamed replies.

Run:  .venv/bin/python bench/serve.py --start-server --num-adapters 4 --duration 20 --rate 2
          (starts `loraplex serve` on the embedded SmolLM2 with 4 rank-16 peft adapters named
           bench-adapter-0..3, cached under ~/.cache/loraplex/bench-adapters, then loads it)
      .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --num-adapters 8 --rate 4 --duration 60
          (against a server already running with adapters bench-adapter-0..7 registered)
      .venv/bin/python bench/serve.py --vs-peft --rounds 5
          (a different mode, issue 12: `loraplex serve` with default settings, closed batches of 8
           requests over 8 distinct adapters vs base only vs in-process peft; bench/serve_vs_peft.py
           has it and its flags: `bench/serve.py --vs-peft --help`)

Requests arrive as a Poisson process at --rate req/s for --duration s (or --num-requests of them).
Each names the base model with probability --base-fraction, else adapter k (k = 0..N-1) with
probability ∝ 1/(k+1)^s (Zipf, s = --zipf-s): adapter 0 is the most popular. Prompts are random
common words, about --prompt-len tokens (each request different, so nothing is shared); every
request streams (SSE, ``stream_options.include_usage``) and, by default, ignores EOS so it makes
exactly --max-tokens tokens. Before the timed run, one short request per model warms the adapters
into the server's tiers (--no-warmup skips it).

Measured on the client from SSE chunk arrival (perf_counter): TTFT = request sent → first chunk
with text; ITL = gaps between successive text chunks (all requests pooled; a chunk may carry more
than one token when the detokenizer holds back a partial character); TPOT = (last - first text
chunk) / (completion tokens - 1) per request; e2e = sent → [DONE]. Token counts come from the
server's usage chunk. Throughput = ok requests and generated tokens / (first send → last finish).
With --start-server the client, the server and its engine share this machine's cores; the server
gets ``--max-lora-rank --rank`` (its slots sized to the bench adapters) plus --server-args (the
--vs-peft mode passes no such flag: it measures the server as a user starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name  # after the path insert: run as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMON_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now "
    "find long down day did get come made may part over new sound take only little work know place year"
)
WORDS = COMMON_WORDS.split()
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
STARTUP_TIMEOUT_S = 300
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Planned:
    """One request of the run: when to send it (s after the start), which model, what prompt."""

    at_s: float
    model: str
    prompt: str


@dataclass
class Outcome:
    """What the client saw of one request."""

    model: str
    sent_s: float  # perf_counter
    status: str = "ok"  # "ok", an HTTP status, "stream error" or a transport error's class name
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    text: str = ""  # the streamed text, concatenated
    done_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (not with --start-server)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="which API to call")
    p.add_argument("--rate", type=float, default=2.0, help="mean arrival rate, requests/s (Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--num-requests", type=int, default=None, help="send this many instead of --duration")
    p.add_argument("--num-adapters", type=int, default=8, help="adapters the traffic spreads over (N)")
    p.add_argument("--adapter-prefix", default="bench-adapter-", help="adapter k is named PREFIX<k>")
    p.add_argument("--zipf-s", type=float, default=1.1, help="popularity of adapter k ∝ 1/(k+1)^s")
    p.add_argument("--base-fraction", type=float, default=0.0, help="share of requests to the base model")
    p.add_argument("--base-model", default=None, help="the base model's name (default: first of /v1/models)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request")
    p.add_argument("--prompt-len", type=int, default=64, help="approximate prompt length in tokens")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens (a vLLM-style extra the server accepts)")  # fmt: skip
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="one short request per model before the timed run")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, adapter choice and prompts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    add_server_args(p)
    args = p.parse_args()
    if args.rate <= 0 or args.max_tokens < 1 or args.num_adapters < 0 or not 0 <= args.base_fraction <= 1:
        p.error("need --rate > 0, --max-tokens >= 1, --num-adapters >= 0 and 0 <= --base-fraction <= 1")
    if args.num_adapters == 0 and args.base_fraction < 1:
        p.error("--num-adapters 0 needs --base-fraction 1")
    return args


def add_server_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("--start-server: launch `loraplex serve` on a free port, load it, stop it")
    group.add_argument("--start-server", action="store_true", help="start the server with N bench adapters")
    group.add_argument("--model", default="smollm2-135m-instruct", help="--model of the started server")
    group.add_argument("--rank", type=int, default=16, help="rank of the generated peft adapters")
    group.add_argument("--server-args", default="", help="more `loraplex serve` flags, one shell string")
    p.add_argument("--vs-peft", action="store_true",
                   help="run issue 12's comparison instead (bench/serve_vs_peft.py, own flags)")  # fmt: skip


# ---- the workload ----


def zipf_weights(count: int, s: float) -> list[float]:
    """P(adapter k) ∝ 1 / (k + 1)^s for k = 0..count-1, normalised."""
    raw = [1.0 / (k + 1) ** s for k in range(count)]
    return [w / sum(raw) for w in raw]


def random_prompt(rng: random.Random, num_words: int) -> str:
    """Common English words (about one token each for a BPE vocabulary), ending in a request."""
    words = " ".join(rng.choice(WORDS) for _ in range(max(1, num_words - 8)))
    return f"{words.capitalize()}. Continue this text in your own words:"


def plan(args, base_model: str) -> list[Planned]:
    """Arrival times (exponential gaps), models (base or Zipf adapter) and prompts, all from --seed."""
    rng = random.Random(args.seed)
    adapters = [f"{args.adapter_prefix}{k}" for k in range(args.num_adapters)]
    weights = zipf_weights(args.num_adapters, args.zipf_s)
    planned, at_s = [], 0.0
    while True:
        at_s += rng.expovariate(args.rate)
        if args.num_requests is None and at_s > args.duration:
            break
        if args.num_requests is not None and len(planned) == args.num_requests:
            break
        is_base = not adapters or rng.random() < args.base_fraction
        model = base_model if is_base else rng.choices(adapters, weights)[0]
        planned.append(Planned(at_s, model, random_prompt(rng, args.prompt_len)))
    return planned


def request_body(args, model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    """(path, JSON body) of one streamed request."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}  # fmt: skip
    if args.endpoint == "chat":
        return PATHS["chat"], {**body, "messages": [{"role": "user", "content": prompt}]}
    return PATHS["completions"], {**body, "prompt": prompt}


# ---- one request ----


def chunk_text(event: dict) -> str:
    """The text a completion or chat chunk carries ('' for the role chunk and the usage chunk)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def note_event(outcome: Outcome, data: str, now_s: float) -> None:
    """Fold one SSE data payload into the outcome."""
    if data == "[DONE]":
        outcome.done_s = now_s
        return
    event = json.loads(data)
    if "error" in event:
        outcome.status, outcome.error = "stream error", str(event["error"].get("message", ""))[:200]
    elif text := chunk_text(event):
        outcome.chunk_s.append(now_s)
        outcome.text += text
    if event.get("usage"):
        outcome.prompt_tokens = event["usage"]["prompt_tokens"]
        outcome.completion_tokens = event["usage"]["completion_tokens"]


async def send(client: httpx.AsyncClient, args, model: str, prompt: str, max_tokens: int) -> Outcome:
    """Stream one request to its end and time its chunks; never raises for a failed request."""
    path, body = request_body(args, model, prompt, max_tokens)
    outcome = Outcome(model, time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                answer = (await response.aread()).decode(errors="replace")
                outcome.status, outcome.error = str(response.status_code), answer[:200]
                return outcome
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    note_event(outcome, line.removeprefix("data: "), time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.status, outcome.error = type(exc).__name__, str(exc)[:200]
    if outcome.status == "ok" and outcome.done_s is None:
        outcome.status = "no [DONE]"
    return outcome


# ---- the run ----


async def run_load(client: httpx.AsyncClient, args, planned: list[Planned]) -> tuple[list[Outcome], float]:
    """Send each planned request at its time (without waiting for earlier ones); (outcomes, wall s)."""
    start = time.perf_counter()
    tasks = []
    for item in planned:
        await asyncio.sleep(max(0.0, start + item.at_s - time.perf_counter()))
        tasks.append(asyncio.create_task(send(client, args, item.model, item.prompt, args.max_tokens)))
    outcomes = await asyncio.gather(*tasks)
    end = max([start, *(o.done_s or 0.0 for o in outcomes)])
    return list(outcomes), end - start


async def warm_up(client: httpx.AsyncClient, args, models: list[str]) -> None:
    """One 2-token request per model, all at once, so adapters are loaded before the timed run."""
    outcomes = await asyncio.gather(*(send(client, args, m, "Hello", 2) for m in models))
    failed = [f"{o.model}: {o.status} {o.error!r}" for o in outcomes if o.status != "ok"]
    if failed:
        sys.exit("warm-up failed (are the adapters registered?):\n  " + "\n  ".join(failed))


async def served_models(client: httpx.AsyncClient) -> list[str]:
    """Ids from /v1/models, the base model first; exits with the server's answer on an error."""
    response = await client.get("/v1/models")
    if response.status_code != 200:
        sys.exit(f"GET /v1/models: {response.status_code} {response.text[:300]}")
    return [m["id"] for m in response.json()["data"]]


async def bench(args, url: str) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        models = await served_models(client)
        base_model = args.base_model or models[0]
        planned = plan(args, base_model)
        missing = sorted({p.model for p in planned} - set(models))
        if missing:
            print(f"warning: not in /v1/models (these requests will fail): {', '.join(missing)}")
        if args.warmup:
            await warm_up(client, args, [m for m in models if m in {p.model for p in planned}])
        before = cpu_snapshot()
        outcomes, wall_s = await run_load(client, args, planned)
        busy = machine_load(before)
    report(args, url, base_model, outcomes, wall_s, busy)


# ---- statistics and report ----


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latencies(ok: list[Outcome]) -> dict[str, list[float]]:
    """TTFT ms, ITL ms (pooled), TPOT ms and e2e s of the successful requests."""
    ttft = [1e3 * (o.chunk_s[0] - o.sent_s) for o in ok if o.chunk_s]
    itl = [1e3 * (b - a) for o in ok for a, b in zip(o.chunk_s, o.chunk_s[1:], strict=False)]
    tpot = [1e3 * (o.chunk_s[-1] - o.chunk_s[0]) / (o.completion_tokens - 1)
            for o in ok if o.chunk_s and o.completion_tokens > 1]  # fmt: skip
    e2e = [o.done_s - o.sent_s for o in ok]
    return {"TTFT ms": ttft, "ITL ms": itl, "TPOT ms": tpot, "e2e s": e2e}


def peak_in_flight(outcomes: list[Outcome]) -> int:
    """Most requests open at once, client side."""
    edges = [(o.sent_s, 1) for o in outcomes] + [(o.done_s or o.sent_s, -1) for o in outcomes]
    peak = current = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        current += step
        peak = max(peak, current)
    return peak


def print_header(args, url: str, base_model: str, outcomes: list[Outcome], busy: float | None) -> None:
    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
          f"python {platform.python_version()}, httpx {httpx.__version__}")  # fmt: skip
    if args.start_server:
        print(f"server: started here (client and server share the cores): {args.server_command}")
    print(f"server: {url}, base model {base_model!r}, endpoint {PATHS[args.endpoint]}")
    amount = f"{args.num_requests} requests" if args.num_requests is not None else f"{args.duration:g} s"
    prompts = [o.prompt_tokens for o in outcomes if o.prompt_tokens]
    mean_prompt = f"{statistics.mean(prompts):.0f}" if prompts else "?"
    print(f"setting: Poisson arrivals at {args.rate:g} req/s for {amount}; {args.num_adapters} adapters "
          f"{args.adapter_prefix}0..{max(args.num_adapters - 1, 0)} by Zipf s={args.zipf_s:g}, base fraction "
          f"{args.base_fraction:g}; prompts ~{args.prompt_len} words (mean {mean_prompt} prompt tokens); "
          f"max_tokens {args.max_tokens}, ignore_eos {args.ignore_eos}, temperature 0, streamed; seed "
          f"{args.seed}; warm-up {args.warmup}")  # fmt: skip
    if busy is not None:
        print(f"load: {busy:.2f} of {os.cpu_count()} cores busy during the run (all processes)")


def print_counts(outcomes: list[Outcome], wall_s: float) -> None:
    ok = [o for o in outcomes if o.status == "ok"]
    errors = Counter(o.status for o in outcomes if o.status != "ok")
    shown = ", ".join(f"{status}: {n}" for status, n in sorted(errors.items())) or "none"
    print(f"\nrequests: {len(outcomes)} sent, {len(ok)} ok; errors by status: {shown}")
    for status in sorted(errors):
        print(f"  e.g. {status}: {next(o.error for o in outcomes if o.status == status)!r}")
    tokens = sum(o.completion_tokens for o in ok)
    print(f"wall: {wall_s:.1f} s (first send -> last finish); peak in flight: {peak_in_flight(outcomes)}")
    print(f"throughput: {len(ok) / wall_s:.2f} req/s, {tokens / wall_s:.1f} generated tok/s "
          f"({tokens} tokens)")  # fmt: skip
    per_model = Counter(o.model for o in outcomes)
    print("requests per model: " + ", ".join(f"{m} {n}" for m, n in per_model.most_common()))


def print_latency_table(ok: list[Outcome]) -> None:
    print("\n| latency | n | p50 | p90 | p99 | mean |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, values in latencies(ok).items():
        cells = [f"{percentile(values, q):.1f}" if "ms" in name else f"{percentile(values, q):.2f}"
                 for q in PERCENTILES]  # fmt: skip
        mean = statistics.mean(values) if values else float("nan")
        print(f"| {name} | {len(values)} | {' | '.join(cells)} | {mean:.{1 if 'ms' in name else 2}f} |")
    print("(TTFT: sent -> first text chunk; ITL: gaps between text chunks, pooled; TPOT: per request, "
          "(last - first chunk) / (tokens - 1); e2e: sent -> [DONE]; all client side)")  # fmt: skip


def report(
    args, url: str, base_model: str, outcomes: list[Outcome], wall_s: float, busy: float | None
) -> None:
    print_header(args, url, base_model, outcomes, busy)
    print_counts(outcomes, wall_s)
    print_latency_table([o for o in outcomes if o.status == "ok"])


# ---- machine ----


def cpu_snapshot() -> tuple[float, float] | None:
    """(wall s, CPU seconds busy on the whole machine) now; None where /proc/stat is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK")


def machine_load(since: tuple[float, float] | None) -> float | None:
    """Cores busy on average since ``since`` (client, server and everything else)."""
    now = cpu_snapshot()
    if since is None or now is None:
        return None
    return (now[1] - since[1]) / (now[0] - since[0])


# ---- --start-server ----


def bench_adapters(args) -> list[Path]:
    """bench/engine.py's cached random rank-``--rank`` peft adapters for ``--model`` (made once)."""
    from bench.engine import adapter_dirs  # imports torch: only in this mode
    from server.config import ModelConfig
    from server.model.loader import resolve_checkpoint

    base_dir = resolve_checkpoint(ModelConfig(model=args.model)).path
    return adapter_dirs(base_dir, args.num_adapters, args.rank)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Poll /ready until 200; exit with the log's tail if the server dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"the server was not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@dataclass(frozen=True)
class Launched:
    """A `loraplex serve` process started here."""

    url: str
    process: subprocess.Popen
    log_path: Path  # its stdout and stderr; gone once the context exits
    command: str  # as a user would type it


@contextmanager
def launched_server(args, adapters: list[Path], flags: list[str]) -> Iterator[Launched]:
    """``loraplex serve --model M`` + ``flags`` + ``--adapter PREFIX<k>=path`` each + --server-args.

    On a free port with a throwaway --data-dir; stopped (SIGTERM, then SIGKILL) on exit.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-serve-") as tmp:
        command = [sys.executable, "-m", "server.cli", "serve", "--model", args.model, "--port", str(port),
                   "--data-dir", str(Path(tmp) / "data"), *flags]  # fmt: skip
        for k, path in enumerate(adapters):
            command += ["--adapter", f"{args.adapter_prefix}{k}={path}"]
        command += shlex.split(args.server_args)
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            started, url = time.perf_counter(), f"http://127.0.0.1:{port}"
            wait_ready(url, process, log_path)
            print(f"(server ready after {time.perf_counter() - started:.1f} s)", file=sys.stderr)
            yield Launched(url, process, log_path, shlex.join(["loraplex", *command[3:]]))
        finally:
            stop(process)


@contextmanager
def started_server(args) -> Iterator[str]:
    """--start-server: the bench adapters, slots padded to their rank (--max-lora-rank); yields the URL."""
    with launched_server(args, bench_adapters(args), ["--max-lora-rank", str(args.rank)]) as server:
        args.server_command = server.command
        yield server.url


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    if "--vs-peft" in sys.argv[1:]:
        from bench.serve_vs_peft import main as vs_peft_main

        vs_peft_main([a for a in sys.argv[1:] if a != "--vs-peft"])
        return
    args = parse_args()
    if args.start_server:
        with started_server(args) as url:
            asyncio.run(bench(args, url))
    else:
        asyncio.run(bench(args, args.url))


if __name__ == "__main__":
    main()
