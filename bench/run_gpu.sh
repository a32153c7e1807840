#!/usr/bin/env bash
# The GPU checks of the mask-step kernels, in one go, on a machine with a CUDA device:
#
#     bash bench/run_gpu.sh            # tests, validate, bench (under 10 minutes, each step time-boxed)
#     bash bench/run_gpu.sh bench      # or any of: tests validate bench
#
# 1. tests:    the kernel tests, compiled on the GPU (tests/kernels/, the GPU-only ones included),
#              and --graphs: real CUDA-graph capture and replay against the eager step
# 2. validate: pgnm-fast validate --device cuda --json
# 3. bench:    bench/bench_kernels.py (fast vs reference, bandwidth vs copy, launch sweeps)
# and writes bench/results/<device>.json: device name, torch and triton versions, the benchmark
# medians and speed-ups, the targets met or not, the validate JSON and the test counts. Every step
# runs even if an earlier one failed; the exit status is non-zero if any failed. Raw outputs go to
# bench/results/raw/ (and the record and raw files to $OUT when that is set, for a remote run).
#
# DEVICE=cpu bash bench/run_gpu.sh runs the same steps on the CPU (the torch fast path; the Triton
# code interpreted in the tests) and writes bench/results/cpu-<processor>.json.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
steps=${*:-tests validate bench}

target=${DEVICE:-cuda}
if [ "$target" = cuda ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "run_gpu.sh: no CUDA device visible to $PY (DEVICE=cpu runs the CPU variant)" >&2
        exit 2
    fi
else
    export CUDA_VISIBLE_DEVICES=""  # the CPU variant, even on a GPU machine
fi
device=$("$PY" -c "
import re, sys, torch
sys.path.insert(0, 'bench')
from conftest import device_name
name = device_name() if torch.cuda.is_available() else 'cpu-' + device_name()
print(re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-'))")
raw=bench/results/raw
mkdir -p "$raw"
"$PY" - <<'PY'
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"device {name}, torch {torch.__version__}, triton {tv}, python {sys.version.split()[0]}")
PY
status=0
run() {  # run NAME TIMEOUT CMD...: time-boxed, status kept, output kept
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$raw/$device-$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

for step in $steps; do
    case $step in
        tests)
            run tests 240 "$PY" -m pytest tests/kernels/test_special.py tests/kernels/test_sample_score.py \
                tests/kernels/test_mask_apply.py tests/kernels/test_masker.py tests/kernels/test_kernels_gpu.py \
                tests/kernels/test_reference.py tests/test_graphs.py tests/test_graphs_gpu.py -q -rs -p no:cacheprovider --junitxml="$raw/$device-tests.xml" ;;
        validate)
            run validate 100 "$PY" -m pgnm_fast.validate --device "$target" --json "$raw/$device-validate.json" ;;
        bench)
            run bench 240 "$PY" -m pytest bench/bench_kernels.py --benchmark-only -q -p no:cacheprovider \
                --benchmark-max-time=0.2 --benchmark-min-rounds=5 --benchmark-json="$raw/$device-bench.json" ;;
        *) echo "run_gpu.sh: unknown step '$step' (tests, validate, bench)" >&2; exit 2 ;;
    esac
done

if [ -f "$raw/$device-bench.json" ]; then
    "$PY" bench/bench_kernels.py summarize "$raw/$device-bench.json" --validate "$raw/$device-validate.json" \
        --tests "$raw/$device-tests.xml" --out "bench/results/$device.json" || status=1
    echo "wrote bench/results/$device.json"
fi
if [ -n "${OUT:-}" ]; then  # a remote run: bring the results back
    mkdir -p "$OUT/results"
    cp "bench/results/$device.json" "$raw/$device"-* "$OUT/results/" 2>/dev/null
fi
exit $status
