"""Adapter registry at scale: 10,000 uploads, lookups, host memory under a budget, cold-load latency.

Run:  .venv/bin/python bench/registry.py            (10,000 rank-1 q_proj adapters on SmolLM2-135M,
                                                     64 MiB host budget, rank-16 cold loads)
      .venv/bin/python bench/registry.py --num-adapters 1000   (a quicker look)

What it does, all on the embedded SmolLM2-135M-Instruct (fp32, CPU), with the real registry, store
(SQLite WAL + fsync'd files under a temp data dir) and the engine's real slot writer:
  1. uploads N small adapters (rank 1 on q_proj of all 30 layers, 138 KB each; the peft file layout,
     config copied from a real peft save, tensors random) through ``AdapterRegistry.upload``, spread
     over 100 tenants: validation + sha256 + fsync + commit, per upload;
  2. times ``list()`` of everything, ``list(tenant)``, ``resolve(tenant, name)``, and a restart (open
     the store and rebuild the index);
  3. attaches an engine's adapter cache with a --host-budget-mb host tier and makes every adapter
     resident in turn (disk → host → slot): host bytes held stay bounded by the budget, not the count;
  4. cold-load latency of one rank-16 adapter on all seven projections: disk → host (read, validate)
     and host → slot (copy into the slot buffers), median and p90 of --repeats runs. The files are
     in the page cache after the first read, so "disk" is the parse/validate cost, not the device.
No figure here is asserted on; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, read_peft_dir
from adapters.registry import AdapterRegistry
from adapters.store import SQLiteAdapterStore
from bench.engine import adapter_dirs, cpu_name
from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.model.factory import load_model

NUM_TENANTS = 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-adapters", type=int, default=10_000)
    parser.add_argument("--host-budget-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="cold loads of the rank-16 adapter")
    return parser.parse_args()


def small_adapter_template(core: EngineCore, root: Path) -> tuple[bytes, dict[str, torch.Size]]:
    """A real peft config (rank 1, q_proj) and the tensor shapes peft saves for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(core.loaded.checkpoint.path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(root / "template")
    shapes = {k: v.shape for k, v in load_file(root / "template" / WEIGHTS_FILE).items()}
    return (root / "template" / CONFIG_FILE).read_bytes(), shapes


def random_weights(shapes: dict[str, torch.Size], seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=generator) * 0.01 for k, s in shapes.items()}
    path = Path(tempfile.mkstemp(suffix=".safetensors")[1])
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    path.unlink()
    return data


def percentiles(samples_s: list[float]) -> str:
    ordered = sorted(samples_s)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {p(0.5) * 1e3:8.3f} ms   p99 {p(0.99) * 1e3:8.3f} ms   n={len(ordered)}"


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def upload_all(registry: AdapterRegistry, config: bytes, shapes, count: int) -> list[float]:
    samples = []
    for i in range(count):
        files = {CONFIG_FILE: io.BytesIO(config), WEIGHTS_FILE: io.BytesIO(random_weights(shapes, i))}
        start = time.perf_counter()
        registry.upload(f"tenant{i % NUM_TENANTS}", f"adapter{i}", files)
        samples.append(time.perf_counter() - start)
        if (i + 1) % 1000 == 0:
            print(f"  uploaded {i + 1}", file=sys.stderr)
    return samples


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def touch_all(core: EngineCore, registry: AdapterRegistry) -> tuple[int, float, float, float]:
    """Make every adapter resident in turn; (max host bytes, RSS before, after, and after handing
    freed heap memory back with malloc_trim) in MB."""
    cache, max_host, rss_before = core.adapters, 0, rss_mb()
    for record in registry.list():
        while cache.try_activate(record.adapter_id) is None:  # loads in the background
            time.sleep(0.0005)
        max_host = max(max_host, cache.host_bytes())
    rss_after = rss_mb()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return max_host, rss_before, rss_after, rss_mb()


def cache_mb(core: EngineCore) -> float:
    return core.adapters.host_bytes() / 1024**2


def cold_loads(core: EngineCore, repeats: int) -> tuple[list[float], list[float]]:
    rank16 = adapter_dirs(core.loaded.checkpoint.path, 1, 16)[0]
    disk, slot = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        weights = read_peft_dir(rank16, 64)
        core.slot_writer.validate(weights)
        disk.append(time.perf_counter() - start)
        start = time.perf_counter()
        core.slot_writer.write(0, weights)
        slot.append(time.perf_counter() - start)
    return disk, slot


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    config = EngineConfig(max_loras=4, max_cpu_adapters_bytes=args.host_budget_mb * 1024**2)
    core = EngineCore(load_model(ModelConfig(model=args.model, device="cpu"), config), config)
    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-registry-"))
    try:
        run(args, core, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, core: EngineCore, root: Path) -> None:
    print(f"$ {shlex.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    config_bytes, shapes = small_adapter_template(core, root)
    store = SQLiteAdapterStore(root / "data")
    registry = AdapterRegistry(store, core.config.max_lora_rank, check=core.slot_writer.validate)
    uploads = upload_all(registry, config_bytes, shapes, args.num_adapters)
    print(f"\n1. upload {args.num_adapters} adapters (validate + sha256 + fsync + commit)")
    print(f"   per upload        {percentiles(uploads)}   total {sum(uploads):.1f} s")
    print(f"\n2. lookups over {len(registry)} adapters in {NUM_TENANTS} tenants")
    print(f"   list() all        {percentiles(timed(registry.list, 20))}")
    print(f"   list(tenant)      {percentiles(timed(lambda: registry.list('tenant7'), 200))}")
    names = [(f"tenant{i % NUM_TENANTS}", f"adapter{i}") for i in range(0, args.num_adapters, 7)]
    resolve = timed(lambda: [registry.resolve(t, n) for t, n in names], 5)
    print(f"   resolve()         {sum(resolve) / (5 * len(names)) * 1e6:8.2f} µs per lookup (mean)")
    restart = timed(lambda: AdapterRegistry(SQLiteAdapterStore(root / "data"), 64), 3)
    print(f"   restart (open store + index) {percentiles(restart)}")
    registry.attach(core.adapters)
    max_host, rss_before, rss_after, rss_trimmed = touch_all(core, registry)
    one = read_peft_dir(registry.list()[0].path, 64).num_bytes
    print(f"\n3. every adapter made resident in turn (disk → host → one of {core.config.max_loras} slots)")
    print(f"   host tier budget {args.host_budget_mb} MiB; adapter {one / 1024:.0f} KiB; "
          f"all {args.num_adapters} would be {args.num_adapters * one / 1024**2:.0f} MiB")  # fmt: skip
    print(f"   max host bytes held {max_host / 1024**2:.1f} MiB; RSS {rss_before:.0f} → {rss_after:.0f} MB, "
          f"{rss_trimmed:.0f} MB after malloc_trim; host tier now {cache_mb(core):.1f} MiB")  # fmt: skip
    disk, slot = cold_loads(core, args.repeats)
    print("\n4. cold load of a rank-16 adapter on all 7 projections (SmolLM2, fp32)")
    print(f"   disk → host       {percentiles(disk)}")
    print(f"   host → slot       {percentiles(slot)}")


if __name__ == "__main__":
    main()
