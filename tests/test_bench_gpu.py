"""bench/gpu.py end to end on CPU with the tiny shapes: the JSON a GPU session's run will write."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_runs_on_cpu_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "bench/gpu.py", "--device", "cpu", "--shapes", "tiny", "--new-tokens", "4",
               "--batches", "2", "--base-batches", "2", "--skip-peft", "--repeats", "1", "--json", str(out),
               "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["device"]["measured_copy_Bps"] > 0
    assert report["model"]["num_hidden_layers"] == 4 and report["new_tokens"] == 4
    mixed, base = report["scenarios"]
    assert (mixed["batch"], mixed["adapters"], base["adapters"]) == (2, True, False)
    for scenario in (mixed, base):
        assert scenario["ours"]["error"] is None, scenario["ours"]
        assert scenario["ours"]["step_ms"] > 0 and scenario["ours"]["decode_tok_s"] > 0
        assert scenario["ours"]["share_of_floor"] > 0 and scenario["floor_ms"] > 0
        assert scenario["peft"] == {"skipped": "--skip-peft"}
        nbytes = scenario["bytes_per_step"]
        assert nbytes["total"] == nbytes["base"] + nbytes["lora"] + nbytes["kv"]
    # two adapters in use add their A and B at rank 16; the base-only step reads none
    assert mixed["bytes_per_step"]["lora"] > 0 and base["bytes_per_step"]["lora"] == 0
    assert "| batch 2, 2 adapters |" in done.stdout and "| batch 2, base only |" in done.stdout
    assert not list(tmp_path.glob("loraplex-gpu-bench-*")), "the temp checkpoint dir is removed"


def test_gpu_bench_against_peft_agrees_on_the_greedy_tokens(tmp_path):
    """fp32 on CPU: our tokens equal peft's mixed-adapter generate's (and HF's with adapters off)."""
    out = tmp_path / "gpu.json"
    command = [sys.executable, "bench/gpu.py", "--device", "cpu", "--shapes", "tiny", "--new-tokens", "4",
               "--peft-new-tokens", "4", "--batches", "2", "--base-batches", "2", "--repeats", "1",
               "--json", str(out), "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for scenario in json.loads(out.read_text())["scenarios"]:
        assert scenario["peft"]["error"] is None and scenario["peft"]["step_ms"] > 0, scenario["peft"]
        assert scenario["tokens_agreeing"] == 4, scenario["name"]
        assert scenario["ours_vs_peft"] == scenario["ours"]["decode_tok_s"] / scenario["peft"]["decode_tok_s"]
