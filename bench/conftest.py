"""pytest-benchmark set-up for bench/: the device the numbers came from goes into the JSON."""
import os
import platform
import sys

import pytest
import torch

# Benchmarks time the real thing: compiled Triton on a GPU, the torch fast path on the CPU.
os.environ.pop("TRITON_INTERPRET", None)
# PGNM_BENCH_THREADS=N pins torch's CPU threads: on a 2-core host shared with other jobs, a busy
# neighbour makes every 2-thread parallel region wait for a descheduled thread (milliseconds per op).
if os.environ.get("PGNM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PGNM_BENCH_THREADS"]))


@pytest.fixture(scope="session")
def synthetic_folders():
    """``make(name, images, size) -> root``: a class-folder synthetic set (seed 0) in the
    synthetic-data cache, made once (into a sibling folder renamed into place when complete)."""
    import shutil

    from pgnm_fast.synth import cache_dir, make_synthetic

    def make(name: str, images: int, size: int):
        root = cache_dir() / name
        if not (root / "train").is_dir():
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            make_synthetic(tmp, images=images, seed=0, size=size, layout="folders")
            os.replace(tmp, root)
        return root
    return make


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


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where bench_step.py times the training step (auto: cuda if visible)")


def pytest_configure(config):
    wanted = config.getoption("--bench-device")
    if wanted == "cuda" and not torch.cuda.is_available():
        pytest.exit("Error: --bench-device cuda: no CUDA device is visible to torch", returncode=2)
    if wanted == "auto":
        config.option.bench_device = "cuda" if torch.cuda.is_available() else "cpu"


def _step_module():
    return sys.modules.get("bench_step")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The training-step ratios into the JSON: per benchmark and as ``step_ratios``."""
    module = _step_module()
    if module is None:
        return
    rows = [(b["extra_info"], b["extra_info"]["seconds_per_step"]) for b in output_json["benchmarks"]
            if b.get("extra_info", {}).get("op") == "train_step"]
    found = module.ratios(rows)
    for b in output_json["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("op") == "train_step":
            info["ratios"] = {r["ratio"]: r["value"] for r in found
                              if (r["model"], r["crop"], r["batch"], r["arm"], r["setting"])
                              == (info["model"], info["crop"], info["batch"], info["arm"], info["setting"])}
    output_json["step_ratios"] = found


def pytest_terminal_summary(terminalreporter):
    module = _step_module()
    if module is None or not module.MEASURED:
        return
    terminalreporter.section("training step: images/s and ratios")
    for info, _ in module.MEASURED:
        mem = f"  peak {info['peak_mem_MiB']:.0f} MiB" if info["peak_mem_MiB"] is not None else ""
        terminalreporter.write_line(f"{info['model']:<10} {info['crop']:>3}px B={info['batch']:<4} "
                                    f"{info['arm']:<9} {info['setting']:<16} {info['img_s']:9.1f} img/s{mem}")
    for line in module.format_ratios(module.ratios(module.MEASURED)):
        terminalreporter.write_line(line)
