#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command, for a lent GPU machine (one H100 or
# H200, nothing outside reachable, at most 10 minutes a command):
#
#     bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#     bash benchmarks/gpu_session.sh --smoke    # the same steps at toy sizes on the CPU (a few minutes)
#
# Steps run in priority order, each under `timeout`, capped by what is left of GPU_SESSION_SECONDS
# (default 540); a step that no longer fits is skipped. Each step's output goes to $OUT/STEP.txt
# (OUT defaults to a new temporary directory), the machine's description to $OUT/environment.txt,
# and a summary with the key lines of every step to $OUT/summary.txt and, last, to stdout. Exit
# status: 0 when every step ran to the end and measured everything, 1 otherwise, 2 when the
# machine cannot run the steps at all. At most 8 files come back from the GPU machine's $OUT:
# keep the steps fewer than 7.
# Nothing is downloaded: where a Python package is missing, the wheels in .whl/ (carried with the
# working tree; docs/benchmarks.md#gpu-measurements-in-one-command) are installed into /tmp/site.
set -u
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
    "") ;;
    --smoke) smoke=1 ;;
    *) echo "error: unknown option '$1'; usage: bash benchmarks/gpu_session.sh [--smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
budget=${GPU_SESSION_SECONDS:-540}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # no hub model is used; never wait on the network
# lines that show a result in the summary, and lines that show a step went wrong though it exited 0
KEY_LINES='baseline|of matmul rate|compile \+ first forward|disk writes|volumes per GPU-hour|^worst|per volume|^(whole volumes|random)|copy:|loader \(device|ratio loader|not measured|^error'
BAD_LINES='not measured|Traceback|^error'

describe_machine() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    uname -srm
    echo "cpus: $(nproc)"
    free -g | head -2
    df -h /tmp . 2>/dev/null
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import sys
from importlib.metadata import version
import torch
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
print(", ".join(f"{name} {version(name)}" for name in ("transformers", "tensorstore", "numpy", "tqdm")))
EOF
}

imports_work() {
    "$PY" -c "import numpy, tensorstore, torch, tqdm, transformers; from transformers import DINOv3ViTModel" 2>/dev/null
}

ensure_packages() {
    imports_work && return 0
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "a package is missing: installing the carried wheels of .whl/ into /tmp/site (no network)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        imports_work && return 0
    fi
    "$PY" -c "import numpy, tensorstore, torch, tqdm, transformers; from transformers import DINOv3ViTModel" 2>&1 | tail -1
    echo "error: $PY lacks a package the benchmarks need (above) and this machine cannot download it; carry its wheels" \
         "in .whl/ (docs/benchmarks.md#gpu-measurements-in-one-command) and run again" >&2
    return 1
}

names=() statuses=() walls=()

# step NAME CAP ARGS...: python ARGS under timeout, output to $OUT/NAME.txt and stdout
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS)) status
    local limit=$((cap < left ? cap : left))
    names+=("$name")
    if ((limit < 20)); then
        statuses+=("skipped (${left} s of the budget left)") walls+=(0)
        return
    fi
    echo "=== $name (at most ${limit} s): $PY $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.txt" | grep --line-buffered -v "has RANDOM weights"
    local rc=${PIPESTATUS[0]}
    walls+=($((SECONDS - started)))
    if ((rc == 124 || rc == 137)); then
        status="timed out after ${limit} s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    elif grep -Eq "$BAD_LINES" "$OUT/$name.txt"; then
        status="incomplete (see $name.txt)"
    else
        status="ok"
    fi
    statuses+=("$status")
}

summary() {
    local i all_ok=0
    echo "=== summary ($( ((smoke)) && echo "smoke run, figures mean nothing" || echo "GPU run"), ${SECONDS} s of ${budget}; files in $OUT)"
    for i in "${!names[@]}"; do
        printf '%-22s %5s s  %s\n' "${names[i]}" "${walls[i]}" "${statuses[i]}"
        [ "${statuses[i]}" = ok ] || all_ok=1
    done
    for i in "${!names[@]}"; do
        [ -f "$OUT/${names[i]}.txt" ] || continue
        echo "--- ${names[i]}"
        grep -E "$KEY_LINES" "$OUT/${names[i]}.txt" | cut -c1-220
    done
    return $all_ok
}

{ describe_machine; } >"$OUT/environment.txt" 2>&1
ensure_packages || exit 2
if ((!smoke)) && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: $PY sees no CUDA GPU ($OUT/environment.txt); run this on the GPU machine, or pass --smoke to check the steps on the CPU" >&2
    exit 2
fi
cat "$OUT/environment.txt"

if ((smoke)); then
    step bench_gpu_volumes 300 -m benchmarks.bench_gpu_volumes --smoke
    step bench_bf16_tolerance 60 -m benchmarks.bench_bf16_tolerance --models random:tiny --sizes 64 --attention-scales 1 --device cpu
    step bench_commit_overlap 60 -m benchmarks.bench_commit_overlap --device cpu --volumes 2 --rounds 1 --output-image-dim 16
    step bench_tokens_loader 90 -m benchmarks.bench_tokens_loader --smoke
    step bench_loader_gpu 60 -m benchmarks.bench_loader_gpu --smoke
    step bench_bf16_512 60 -m benchmarks.bench_bf16_tolerance --models random:tiny --sizes 32 --batch-size 1 --attention-scales 1 --device cpu
else
    step bench_gpu_volumes 420 -m benchmarks.bench_gpu_volumes --layouts dense tokens --volumes-per-job 8
    step bench_bf16_tolerance 120 -m benchmarks.bench_bf16_tolerance --device cuda
    step bench_commit_overlap 120 -m benchmarks.bench_commit_overlap --device cuda --model-id random:vitl16 --output-image-dim 128 --volumes 3 --rounds 2
    step bench_tokens_loader 150 -m benchmarks.bench_tokens_loader --device cuda --crops 16
    step bench_loader_gpu 120 -m benchmarks.bench_loader_gpu
    step bench_bf16_512 90 -m benchmarks.bench_bf16_tolerance --device cuda --models random:vitl16 --sizes 512 --batch-size 1 --attention-scales 1 2 3
fi
summary | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
