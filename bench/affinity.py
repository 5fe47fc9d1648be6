"""Adapter-affinity routing on Ray Serve against routing by load alone (issue 17).

Run:  .venv/bin/python bench/affinity.py                       (about 5 minutes on 2 cores)
      .venv/bin/python bench/affinity.py --requests 3000 --adapters 200 --replicas 4

Starts a real PostgreSQL (Debian's package, in a temp dir) and moto's S3 server as the shared
catalogue, uploads --adapters random rank-16 peft adapters of a random Llama with SmolLM2's layer
shapes (576 hidden, 1536 MLP, 9/3 heads; --layers of them, so the adapters and the cost of loading
one are real, the compute small), then for each routing mode starts ``loraplex serve-ray
--num-replicas 4 --max-loras 8`` afresh and sends the same --requests completions (Zipf s = 1.1
over the adapters, --concurrency clients in a closed loop, 4 tokens each). Each replica's host tier
holds --host-adapters adapters (``--max-cpu-adapters-bytes``; 48, about a quarter of the
catalogue: a replica's share), as a real host budget holds a fraction of a large catalogue.

Modes: ``spread`` (``--route-by-adapter off``: Ray Serve's power-of-two-choices on load),
``affinity`` (the defaults: the adapter is the multiplexed model id, Ray Serve remembering 1024
ids per replica, so each adapter stays where it first went) and ``affinity:N`` (Ray Serve
remembering N ids per replica: 8 = the device slots, placements forgotten and made again).
Printed per mode: loads (bucket/disk → host memory reads, summed over the replicas' ``/v1/stats``),
slot loads (host → device slot copies), request latency p50/p99, and the ratio of loads against
``spread``. No figure here is asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from bench.serve import percentile, stop, wait_ready, zipf_weights
from tests.services import S3_ENV, MotoS3, Postgres, free_port, postgres_bin_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "loraplex-bench-affinity"
FILES = ("adapter_config.json", "adapter_model.safetensors")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--slots", type=int, default=8, help="--max-loras of each replica")
    p.add_argument(
        "--host-adapters",
        type=int,
        default=48,
        help="adapters each replica's host tier holds (48: about a replica's share)",
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument(
        "--modes",
        default="spread,affinity,affinity:8",
        help="spread, affinity (Ray Serve holds the default ids per replica) or affinity:N",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def model_and_adapters(args) -> tuple[Path, list[Path]]:
    """The random base and its random rank-16 adapters, made once under the temp dir."""
    from tests.engine.test_engine_parity import save_peft_adapter
    from tests.engine.tiny import write_tiny_llama

    root = CACHE / f"l{args.layers}"
    model = root / "model"
    if not (model / "config.json").exists():
        write_tiny_llama(model, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=args.layers)  # fmt: skip
    adapters = []
    for k in range(args.adapters):
        directory = root / f"adapter-{k}"
        if not (directory / FILES[1]).exists():
            save_peft_adapter(model, directory, seed=1000 + k, r=16, lora_alpha=32, target_modules=TARGETS)
        adapters.append(directory)
    return model, adapters


def upload_all(url: str, adapters: list[Path]) -> None:
    with httpx.Client(timeout=120) as client:
        for k, directory in enumerate(adapters):
            files = [("files", (f, (directory / f).read_bytes())) for f in FILES]
            response = client.post(f"{url}/v1/adapters", data={"name": f"a{k}"}, files=files)
            if response.status_code != 201:
                sys.exit(f"upload of a{k} failed: {response.status_code} {response.text}")


def start(args, mode: str, model: Path, catalogue: tuple[str, str], env: dict, adapter_bytes: int, log: Path):
    port = free_port()
    command = [
        sys.executable, "-m", "server.cli", "serve-ray", "--model", str(model), "--port", str(port),
        "--dtype", "float32", "--adapter-store", catalogue[0], "--adapter-blobs", catalogue[1],
        "--data-dir", tempfile.mkdtemp(prefix="affinity-data-"), "--max-loras", str(args.slots),
        "--max-lora-rank", "16", "--num-replicas", str(args.replicas),
        "--replica-cpus", str(round(1.8 / args.replicas, 2)), "--merge-policy", "off",
        "--max-cpu-adapters-bytes", str(args.host_adapters * adapter_bytes),
        "--route-by-adapter", "off" if mode == "spread" else "on",
    ]  # fmt: skip
    if mode.startswith("affinity:"):
        command += ["--max-adapters-per-replica", mode.split(":")[1]]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url, "loraplex " + " ".join(command[3:])


async def traffic(url: str, models: list[str], concurrency: int) -> list[float]:
    """Closed loop: ``concurrency`` clients send the planned requests in order; latencies in s."""
    queue = list(reversed(models))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            model = queue.pop()
            body = {"model": model, "prompt": "Tell me a story", "max_tokens": 4, "temperature": 0}
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{model}: {response.status_code} {response.text[:300]}")
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies


def replica_loads(url: str, replicas: int) -> dict[str, tuple[int, int]]:
    """{replica: (loads, slot loads)} from each replica's /v1/stats (polled until all answered)."""
    seen: dict[str, tuple[int, int]] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(400):
            response = client.get(f"{url}/v1/stats", params={"window": 60})
            adapters = response.json()["adapters"]
            seen[response.headers["x-loraplex-replica"]] = (adapters["loads"], adapters["slot_loads"])
            if len(seen) == replicas:
                break
    return seen


def main() -> None:
    args = parse_args()
    if postgres_bin_dir() is None:
        sys.exit("needs PostgreSQL (Debian: apt-get install postgresql)")
    model, adapters = model_and_adapters(args)
    adapter_bytes = sum((adapters[0] / f).stat().st_size for f in FILES)
    rng = random.Random(args.seed)
    plan = [f"a{k}" for k in rng.choices(range(args.adapters), zipf_weights(args.adapters, args.zipf),
                                         k=args.requests)]  # fmt: skip
    postgres, s3 = Postgres(postgres_bin_dir()).init(), MotoS3().start()
    work = Path(tempfile.mkdtemp(prefix="affinity-"))
    rows, command = [], ""
    try:
        s3.client().create_bucket(Bucket="bench")
        catalogue = (postgres.new_database("affinity"), "s3://bench/adapters")
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3.url, "RAY_USAGE_STATS_ENABLED": "0"}
        for i, mode in enumerate(args.modes.split(",")):
            process, url, command = start(
                args, mode, model, catalogue, env, adapter_bytes, work / f"{mode}.log"
            )
            try:
                if i == 0:
                    upload_all(url, adapters)
                started = time.perf_counter()
                latencies = asyncio.run(traffic(url, plan, args.concurrency))
                wall = time.perf_counter() - started
                loads = replica_loads(url, args.replicas)
            finally:
                stop(process)
                ray = Path(sys.executable).parent / "ray"  # the local cluster, should the driver not stop it
                subprocess.run([str(ray), "stop", "--force"], capture_output=True, check=False)
            rows.append((mode, sum(v[0] for v in loads.values()), sum(v[1] for v in loads.values()),
                         percentile(latencies, 0.5), percentile(latencies, 0.99), wall, loads))  # fmt: skip
            print(json.dumps({"mode": mode, "per_replica": loads}), file=sys.stderr)
    finally:
        s3.stop()
        postgres.destroy()
        shutil.rmtree(work, ignore_errors=True)
    report(args, rows, adapter_bytes, command)


def report(args, rows, adapter_bytes: int, command: str) -> None:
    print(f"machine: {cpu_name()}; {args.replicas} replicas x {args.slots} slots, host tier "
          f"{args.host_adapters} adapters ({adapter_bytes / 2**20:.1f} MiB each), {args.adapters} adapters, "
          f"Zipf s={args.zipf}, {args.requests} requests, {args.concurrency} concurrent")  # fmt: skip
    print(f"last command: {command}")
    columns = ["routing", "loads (bucket/disk → host)", "slot loads (host → slot)", "p50 ms", "p99 ms",
               "wall s", "loads vs spread"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    spread = next((r[1] for r in rows if r[0] == "spread"), None)
    for mode, loads, slot_loads, p50, p99, wall, _ in rows:
        ratio = f"{spread / loads:.1f}x fewer" if spread and loads and mode != "spread" else "—"
        print(
            f"| {mode} | {loads} | {slot_loads} | {p50 * 1e3:.0f} | {p99 * 1e3:.0f} | {wall:.1f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
