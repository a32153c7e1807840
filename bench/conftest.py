"""pytest-benchmark set-up for bench/: the device the numbers came from goes into the JSON."""
import os
import platform

import torch

# Benchmarks time the real thing: compiled Triton on a GPU, the torch fast path on the CPU.
os.environ.pop("TRITON_INTERPRET", None)
# PGNM_BENCH_THREADS=N pins torch's CPU threads: on a 2-core host shared with other jobs, a busy
# neighbour makes every 2-thread parallel region wait for a descheduled thread (milliseconds per op).
if os.environ.get("PGNM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PGNM_BENCH_THREADS"]))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info.update({"device": "cuda" if torch.cuda.is_available() else "cpu",
                         "device_name": device_name(), "torch": torch.__version__, "triton": triton_version,
                         "torch_threads": torch.get_num_threads()})
