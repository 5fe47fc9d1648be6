#!/usr/bin/env bash
# The one script a GPU session runs through the device tool (docs/benchmarks.md, "GPU"):
#
#     bash bench/gpu_device.sh                         # on the GPU machine, from the repo root
#     DEVICE=cpu SHAPES=tiny bash bench/gpu_device.sh  # CPU smoke test of this same script
#
# Each step has its own timeout, so the whole stays under ~8 minutes (the defaults: 30 + 90 + 330 s),
# and writes its log under $OUT (the device tool brings that folder back: at most 8 files):
#   env.log     nvidia-smi, python and package versions, what the engine imports
#   pytest.log  `pytest -m gpu` over the test files that carry the marker, then the Triton LoRA
#               kernel tests (tests/ops/test_lora_triton.py: on CUDA they run the real kernels)
#   gpu.log     bench/gpu.py's output; gpu.json and gpu.md its results (rewritten per scenario)
#   status.txt  each step's exit status
# Nothing is installed: the device has no internet. The engine's imports for this bench are torch,
# transformers, safetensors, numpy, jinja2 and peft, all in the device image (no fastapi, pydantic or
# prometheus_client: bench/gpu.py imports only server/engine, server/model and adapters/).
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-8b}
PY=${PY:-python3}
BENCH_ARGS=${BENCH_ARGS:-}  # extra bench/gpu.py flags, e.g. "--new-tokens 4 --batches 2"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: >"$OUT/status.txt"

step() {  # step NAME TIMEOUT_S LOG COMMAND...: run with a timeout, log to $OUT/LOG, record the status
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/$log"
    timeout -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    echo "$name: rc=$rc$([ "$rc" -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/status.txt"
    return 0
}

environment() {
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "triton", "safetensors", "tokenizers", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "MISSING:", error)
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
before = set(sys.modules)
import bench.gpu  # noqa: F401 - what the bench imports, checked before the timed steps
print("bench imports:", sorted({m.split(".")[0] for m in set(sys.modules) - before if not m.startswith("_")}))
EOF
}

gpu_tests() {
    local files
    files=$(grep -rlE 'pytest\.mark\.gpu|mark\.gpu' tests --include='*.py' || true)
    if [ -z "$files" ]; then
        echo "no test file carries the gpu marker"
    else
        # shellcheck disable=SC2086 # one argument per file
        "$PY" -m pytest -q -m gpu -p no:cacheprovider $files
        local rc=$?
        [ "$rc" -eq 5 ] && echo "pytest collected no gpu test (exit 5): not a failure" && rc=0
        [ "$rc" -ne 0 ] && return "$rc"
    fi
    "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_lora_triton.py
}

export -f environment gpu_tests  # timeout runs programs, not functions: a bash -c runs each
export PY
step environment 30 env.log bash -c environment
step gpu-tests 90 pytest.log bash -c gpu_tests
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
step bench "$BENCH_TIMEOUT" gpu.log "$PY" bench/gpu.py --device "$DEVICE" --shapes "$SHAPES" \
    --time-budget-s $((BENCH_TIMEOUT - 30)) --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" $BENCH_ARGS
cat "$OUT/status.txt"
[ -f "$OUT/gpu.md" ] && cat "$OUT/gpu.md"
exit 0
