"""The start-up CPU measurement: what it times, what it picks, and its cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from server.model import cpu_tuning
from server.model.cpu_tuning import GemmShapes
from server.ops import attention_native
from server.ops.cpu_info import cpu_snapshot, other_load

CONFIG = SimpleNamespace(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=100,
)  # fmt: skip


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_shapes_of_a_config():
    shapes = GemmShapes.of(CONFIG)
    assert shapes.layer == ((64 + 2 * 32, 64), (64, 64), (256, 64), (64, 128))
    assert shapes.slices == ((64, 32, 32), (64,), (128, 128), (64,))
    assert shapes.heads == (4, 2, 16)


def test_measure_times_every_candidate_and_picks_the_fastest_of_each(tmp_path):
    choice = cpu_tuning.measure(GemmShapes.of(CONFIG), None, 2, tmp_path)
    timings = choice.timings_ms
    assert {"float32 x·Wᵀ", "bfloat16 x·Wᵀ", "LoRA torch float32", "attention torch"} <= timings.keys()
    if attention_native.load(tmp_path) is not None:
        assert "attention native" in timings
    gemm_label = cpu_tuning.GEMM_KERNELS[choice.gemm]
    gemms = {k: v for k, v in timings.items() if k.split(" ", 1)[0] in cpu_tuning.CANDIDATE_DTYPES}
    assert timings[f"{choice.dtype} {gemm_label}"] == min(gemms.values())
    attention = {k: v for k, v in timings.items() if k.startswith("attention ")}
    assert timings[f"attention {choice.attention_kernel}"] == min(attention.values())
    lora = {k: v for k, v in timings.items() if k.startswith("LoRA ")}
    threads = f" {choice.lora_threads} threads" if choice.lora_threads > 1 else ""
    assert timings[f"LoRA {choice.lora_kernel}{threads} {choice.lora_dtype}"] == min(lora.values())
    if attention_native.load(tmp_path) is not None and torch.get_num_threads() > 1:
        assert f"LoRA native {torch.get_num_threads()} threads float32" in timings
    line = choice.describe()
    assert line.startswith("cpu tuning: ") and f"attention {choice.attention_kernel}" in line


def test_a_fixed_dtype_is_the_only_one_measured(tmp_path):
    choice = cpu_tuning.measure(GemmShapes.of(CONFIG), "float32", 2, tmp_path)
    assert choice.dtype == "float32"
    assert not any(k.startswith("bfloat16 ") for k in choice.timings_ms)


def test_unknown_heads_keep_the_torch_attention(tmp_path):
    shapes = GemmShapes.of(CONFIG)
    no_heads = GemmShapes(shapes.layer, shapes.lm_head, shapes.num_layers, shapes.slices)
    assert cpu_tuning._pick_attention(no_heads, torch.float32, tmp_path, {}) == "torch"


def test_the_choice_is_cached_per_cpu_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "other_load", lambda since: 0.0)  # a quiet machine
    shapes = GemmShapes.of(CONFIG)
    first = cpu_tuning.choose(shapes, "float32", tmp_path)
    assert first.source == "measured"
    files = list((tmp_path / "tuning").glob("cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["attention_kernel"] == first.attention_kernel
    monkeypatch.setattr(cpu_tuning, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = cpu_tuning.choose(shapes, "float32", tmp_path)
    assert again.source == "cached" and again.attention_kernel == first.attention_kernel
    assert again.gemm == first.gemm and again.lora_kernel == first.lora_kernel
    monkeypatch.undo()
    monkeypatch.setattr(cpu_tuning, "other_load", lambda since: 0.0)
    cpu_tuning.choose(
        GemmShapes.of(SimpleNamespace(**{**vars(CONFIG), "num_hidden_layers": 3})), "float32", tmp_path
    )
    assert len(list((tmp_path / "tuning").glob("cpu-*.json"))) == 2, "other shapes: another entry"


def test_a_measurement_under_load_serves_but_is_not_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu_tuning, "other_load", lambda since: 1.2)  # another process on a core
    choice = cpu_tuning.choose(GemmShapes.of(CONFIG), "float32", tmp_path)
    assert choice.source == "measured" and choice.other_load == 1.2
    assert not list((tmp_path / "tuning").glob("cpu-*.json"))
    assert "not cached" in choice.describe() and "1.2 cores busy" in caplog.text


def test_a_remembered_measurement_is_reused_per_context_and_not_cached_under_load(tmp_path, monkeypatch):
    shapes, calls = GemmShapes.of(CONFIG), []

    def measure() -> dict[str, float]:
        calls.append(1)
        return {"int4": 15.6, "dense": 15.7 + len(calls)}

    monkeypatch.setattr(cpu_tuning, "other_load", lambda since: 0.0)
    first = cpu_tuning.remembered("probe", shapes, "bfloat16 onednn", tmp_path, measure)
    assert cpu_tuning.remembered("probe", shapes, "bfloat16 onednn", tmp_path, measure) == first
    assert len(calls) == 1, "a restart reuses the measurement instead of timing again"
    assert (
        cpu_tuning.remembered("probe", shapes, "float32 x_wt", tmp_path, measure) != first
    )  # another context
    monkeypatch.setattr(cpu_tuning, "other_load", lambda since: 1.5)
    cpu_tuning.remembered("probe", shapes, "noisy", tmp_path, measure)
    cpu_tuning.remembered("probe", shapes, "noisy", tmp_path, measure)
    assert len(calls) == 4, "taken under load: measured again next time"
    assert len(list((tmp_path / "tuning").glob("probe-*.json"))) == 2


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat")
def test_other_load_sees_another_busy_process():
    since = cpu_snapshot()
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1: pass"]
    )
    busy.wait()
    assert other_load(since) > 0.5  # one process spun a core for a second; we slept
    # Our own work is not other processes' load. The machine may be shared (other test runs), so
    # compare with the load seen over an idle window of the same length right after.
    started = time.monotonic()
    quiet = cpu_snapshot()
    for _ in range(3_000_000):
        pass
    spun = time.monotonic() - started
    own_work_load = other_load(quiet)
    idle = cpu_snapshot()
    time.sleep(spun)
    assert own_work_load < other_load(idle) + 0.5
