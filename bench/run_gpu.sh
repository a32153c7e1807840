#!/usr/bin/env bash
# Everything a GPU must show, in one command. The default steps finish in under 9 minutes on one
# H100/H200, the loader step in under 3: each step is time-boxed (--plan lists the boxes), a step
# stopped at its box keeps what it measured, and every step runs even if an earlier one failed.
#
#     bash bench/run_gpu.sh                       # the default steps below, each time-boxed
#     bash bench/run_gpu.sh step train            # or any of: tests validate bench step train compile loader
#     DEVICE=cpu bash bench/run_gpu.sh --quick    # the same steps at tiny sizes on the CPU (CI)
#     bash bench/run_gpu.sh loader                # --loader device: its kernel tests and benchmark (not in the default)
#     bash bench/run_gpu.sh --plan [STEP...]      # the steps and their time-boxes, nothing run
#
# 1. tests:    the kernel tests compiled on the GPU (tests/kernels/, the GPU-only ones included),
#              --graphs: real CUDA-graph capture and replay against the eager step, and the fast
#              paths' self-check (pgnm_fast/self_check.py) on the GPU
# 2. validate: pgnm-fast validate --device cuda --json
# 3. bench:    bench/bench_kernels.py (fast vs reference, bandwidth vs copy, launch sweeps)
# 4. step:     bench/bench_step.py (images/s of the whole training step: plain / heated reference /
#              heated fused / the authors' way; fp32, bf16, channels-last, graphs), the cases the
#              targets (bench/targets.py) read first; each case's figures also go to
#              <tag>-step-rows.jsonl as it ends
# 5. train:    `pgnm-fast train --amp --graphs` end to end, resnet50 at 224 x 224, batch 256, on
#              a synthetic set made for it (3,200 images of 160 px), 3 epochs of 8 steps; the
#              img/s the trainer reports, and its steady rate over the last epoch's steps
# Not in the default (named only): compile, bench_step.py's torch.compile cases (resnet50 at
# batch 256: inductor's first compile of a resnet50 training step takes minutes on a fresh
# machine), and loader.
# Then bench/report.py writes bench/results/<device>.json: device, driver, torch, triton, every
# figure and every target met or not; a later run of some steps only (say, the steps a stopped
# run did not finish) adds its figures to that record and keeps the others. The exit status is
# non-zero if any step failed. Raw outputs go to bench/results/raw/. With --quick the record goes to
# bench/results/raw/<device>-quick.json (the committed records stay as they are).
# OUT: a folder that gets the record and the raw outputs (optional); each step's log is written
# there as it runs and its other outputs as it ends, so a run stopped from outside keeps them.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
quick=0
plan=0
steps=()
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --plan) plan=1 ;;
        tests|validate|bench|step|train|compile|loader) steps+=("$arg") ;;
        *) echo "run_gpu.sh: unknown step '$arg' (tests validate bench step train compile loader, or --quick, --plan)" >&2
           exit 2 ;;
    esac
done
[ ${#steps[@]} -gt 0 ] || steps=(tests validate bench step train)

target=${DEVICE:-cuda}
case $target in
    cuda|cpu) ;;
    *) echo "run_gpu.sh: DEVICE must be cuda or cpu, not '$target'" >&2; exit 2 ;;
esac

pytest_q=(-q -rs -p no:cacheprovider)
bench_q=(--benchmark-only --bench-device "$target" --benchmark-max-time=0.2 --benchmark-min-rounds=5)
if [ $quick = 1 ]; then
    test_files=(tests/test_graphs.py tests/test_graphs_gpu.py tests/kernels/test_kernels_gpu.py tests/pipelines/test_uint8_batches.py
                tests/test_self_check.py::test_self_check_passes_on_the_gpu -k "not replayed")
    validate_q=(--quick)
    kernel_k=(-k "test_step and 32")
    bench_q=(--benchmark-only --bench-device "$target" --benchmark-max-time=0.02 --benchmark-min-rounds=1)
    export PGNM_BENCH_QUICK=1
    synth=(--images 200 --size 40)
    train=(--model resnet10t -b 16 --train-crop-size 32 --val-resize-size 36 --val-crop-size 32
           --grid 8 --epochs 1 -j 1 --print-freq 2)
    limits=(tests=180 validate=180 bench=120 step=180 train=180 compile=60 loader-tests=240 loader-bench=300)
else
    # the GPU-only tests first (a time-box keeps them), then the kernel tests that run on the GPU
    # when one is present; the CPU-only ones (test_reference.py, test_graphs.py's emulated
    # capture) run in the CPU suite
    test_files=(tests/kernels/test_kernels_gpu.py tests/test_graphs_gpu.py tests/pipelines/test_uint8_batches.py
                tests/test_self_check.py::test_self_check_passes_on_the_gpu
                tests/kernels/test_special.py tests/kernels/test_sample_score.py tests/kernels/test_mask_apply.py
                tests/kernels/test_masker.py tests/test_models.py::test_policy_step_captures_in_a_cuda_graph)
    validate_q=()
    kernel_k=(-k "not config_sweep")
    synth=(--images 3200 --size 160)
    train=(--model resnet50 -b 256 --train-crop-size 224 --val-resize-size 256 --val-crop-size 224
           --grid 64 --epochs 3 -j 8 --print-freq 2)
    # The default steps' boxes sum to 475 s: with the start, the record and a step's 10 s kill
    # grace they finish in under 9 minutes; the loader step's sum to 180 s (tests/test_run_gpu.py
    # checks both sums).
    limits=(tests=90 validate=55 bench=60 step=170 train=100 compile=240 loader-tests=60 loader-bench=120)
    # the CPU at full size: the step benchmarks alone take minutes (a time-box against hangs only)
    [ "$target" = cpu ] && limits=(tests=900 validate=300 bench=600 step=1200 train=900 compile=600
                                   loader-tests=900 loader-bench=900)
fi
limit() { local kv; for kv in "${limits[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
parts() {  # the time-boxed runs of a step
    case $1 in
        loader) echo loader-tests loader-bench ;;
        *) echo "$1" ;;
    esac
}

if [ $plan = 1 ]; then  # the time-boxes, nothing run
    total=0
    for step in "${steps[@]}"; do
        for part in $(parts "$step"); do
            echo "$part $(limit "$part")"
            total=$((total + $(limit "$part")))
        done
    done
    echo "total $total"
    exit 0
fi

for tool in timeout tee mktemp; do  # coreutils: every step runs under timeout
    command -v "$tool" > /dev/null || { echo "run_gpu.sh: '$tool' is not installed (coreutils)" >&2; exit 2; }
done
# the CPU variant, even on a GPU machine; one torch thread unless told (bench/conftest.py)
[ "$target" = cpu ] && export CUDA_VISIBLE_DEVICES="" PGNM_BENCH_THREADS=${PGNM_BENCH_THREADS:-1}
# one interpreter start (an import of torch takes seconds) for the device check and its name
device=$("$PY" -c "
import re, sys, torch
if '$target' == 'cuda' and not torch.cuda.is_available():
    sys.exit(2)
sys.path.insert(0, 'bench')
from conftest import device_name
name = device_name() if torch.cuda.is_available() else 'cpu-' + device_name()
print(re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-'))" | tail -n 1)
if [ -z "$device" ]; then
    [ "$target" = cuda ] && echo "run_gpu.sh: no CUDA device visible to $PY (DEVICE=cpu runs the CPU variant)" >&2 \
        || echo "run_gpu.sh: $PY could not import torch" >&2
    exit 2
fi
raw=bench/results/raw
tag=$device$([ $quick = 1 ] && echo -quick)
mkdir -p "$raw"
saved=
if [ -n "${OUT:-}" ]; then
    saved=$OUT/results
    mkdir -p "$saved"
fi
save() { [ -z "$saved" ] || cp "$raw/$tag"-* "$saved/" 2> /dev/null; }
stems() {  # the raw outputs of a step
    case $1 in
        step) echo step step-rows ;;
        compile) echo step-compile ;;
        train) echo train train-metrics ;;
        loader) echo loader-tests loader-bench loader ;;
        *) echo "$1" ;;
    esac
}
for step in "${steps[@]}"; do  # this run's steps start afresh; the others' outputs stay for the record
    for stem in $(stems "$step"); do rm -f "$raw/$tag-$stem".*; done
done
command -v nvidia-smi > /dev/null && timeout 20 nvidia-smi > "$raw/$tag-nvidia-smi.txt" 2>&1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "device $device, quick $quick, steps ${steps[*]}"

status=0
run() {  # run NAME CMD...: time-boxed, status kept, output kept (and saved as it comes)
    local name=$1 limit
    limit=$(limit "$1")
    shift
    echo "== $name ($(date +%T), at most ${limit} s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$raw/$tag-$name.log" ${saved:+"$saved/$tag-$name.log"}
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    echo "$rc" > "$raw/$tag-$name.rc"
    save
    # pytest's 5: no case selected (the compile cases exist on a GPU only)
    [ "$rc" -eq 0 ] || { [ "$name" = step-compile ] && [ "$rc" -eq 5 ]; } || status=1
}

for step in "${steps[@]}"; do
    case $step in
        tests)
            run tests "$PY" -m pytest "${test_files[@]}" "${pytest_q[@]}" --junitxml="$raw/$tag-tests.xml" ;;
        validate)
            run validate "$PY" -m pgnm_fast.validate --device "$target" "${validate_q[@]}" \
                --json "$raw/$tag-validate.json" ;;
        bench)
            run bench "$PY" -m pytest bench/bench_kernels.py "${kernel_k[@]}" "${pytest_q[@]}" \
                "${bench_q[@]}" --benchmark-json="$raw/$tag-bench.json" ;;
        step)
            PGNM_BENCH_ROWS="$raw/$tag-step-rows.jsonl" run step "$PY" -m pytest bench/bench_step.py \
                -k "not compile" "${pytest_q[@]}" "${bench_q[@]}" --benchmark-json="$raw/$tag-step.json" ;;
        compile)  # apart: a time-out here keeps the other figures
            run step-compile "$PY" -m pytest bench/bench_step.py -k compile "${pytest_q[@]}" \
                "${bench_q[@]}" --benchmark-json="$raw/$tag-step-compile.json" ;;
        train)
            export PY work target SYNTH_ARGS="${synth[*]}" TRAIN_ARGS="${train[*]}"
            run train bash -c '
                "$PY" -m pgnm_fast synth --out "$work/data" $SYNTH_ARGS > /dev/null || exit 1
                exec "$PY" -m pgnm_fast train --data "$work/data" --out "$work/run" --amp --graphs \
                    --device "$target" $TRAIN_ARGS'
            # after the run, even one stopped at its time-box: the epochs it finished
            cp "$work/run/metrics.jsonl" "$raw/$tag-train-metrics.jsonl" 2> /dev/null && save ;;
        loader)  # --loader device: its kernel against the torch version, then its benchmark
            run loader-tests "$PY" -m pytest tests/kernels/test_resized_crop.py "${pytest_q[@]}"
            run loader-bench "$PY" -m pytest bench/bench_device_loader.py --benchmark-only -q -s \
                -p no:cacheprovider --benchmark-json="$raw/$tag-loader.json" ;;
    esac
done

out=bench/results/$device.json
[ $quick = 1 ] && out=$raw/$tag.json
"$PY" bench/report.py record --raw "$raw" --tag "$tag" --out "$out" || status=1
[ -z "$saved" ] || cp "$out" "$saved/" 2> /dev/null
save
exit $status
