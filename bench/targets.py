"""The performance targets, stated once.

bench/report.py judges each record against them and renders them at the head of the generated
performance table (docs/performance.md); the benchmarks print a figure beside its target from
here. Targets are reported, never asserted: timings on a shared host vary.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Target:
    name: str
    figure: str    # what is measured, and at what size
    op: str        # ">=", "<=" or "<"
    needed: float
    on: str        # the hardware it is stated for
    bench: str     # the benchmark that measures it

    @property
    def needed_text(self) -> str:
        return f"{self.op} {self.needed:,g}"

    def met(self, value) -> bool | None:
        """Met or not; None where nothing was measured."""
        return None if value is None else bool(_OPS[self.op](value, self.needed))

    def line(self, value, unit: str = "") -> str:
        """``target >= 1.5 (CPU): met`` for a benchmark's printout."""
        met = {True: "met", False: "NOT met", None: "not measured"}[self.met(value)]
        return f"target {self.needed_text}{unit} ({self.on}): {met}"


_H = "heated fused step, resnet50 224 px, bf16 + channels-last + graphs"
GPU = "one H100/H200"
TARGETS = {t.name: t for t in [
    # the training step (bench_step.py); report.py reads them from the step's figures
    Target("heated_img_s", f"{_H}, B 256: img/s", ">=", 4500.0, GPU, "bench_step.py"),
    Target("heated_over_plain", f"{_H}, B 256: time over the plain step's", "<=", 1.3, GPU, "bench_step.py"),
    Target("fused_vs_authors", f"{_H}, B 256: speed over the authors' way", ">=", 4.0, GPU, "bench_step.py"),
    Target("graphs_vs_eager_b32", f"{_H}, B 32: speed over eager", ">=", 1.2, GPU, "bench_step.py"),
    # the mask step (bench_kernels.py)
    Target("mask_step_speedup", "mask step, fused over reference (G 64, 224 px, B 32-256)", ">=", 20.0, GPU,
           "bench_kernels.py"),
    Target("mask_step_speedup_cpu", "mask step, fused over reference (G 64, 224 px, B 32-64)", ">=", 1.0, "CPU",
           "bench_kernels.py"),
    Target("apply_fraction_of_copy", "fused apply's bandwidth over a copy's (B 256, 224 px, bf16)", ">=", 0.85,
           GPU, "bench_kernels.py"),
    # the data paths (bench_device_loader.py, bench_pipelines.py)
    Target("device_loader_img_s", "--loader device, train images/s, B 256, 224 px", ">=", 50000.0, GPU,
           "bench_device_loader.py"),
    Target("device_over_plain_loader", "--loader device over the plain loader, images/s", ">=", 1.0, "CPU",
           "bench_device_loader.py"),
    Target("data_path_share", "device loader's fill over a resnet50 bf16 step, B 256", "<", 0.02, GPU,
           "bench_device_loader.py"),
    Target("dali_cpu_png_over_plain", "DALI CPU from PNG over the plain loader", ">=", 1.5, "CPU",
           "bench_pipelines.py"),
    Target("dali_cpu_cache_over_plain", "DALI CPU from the packed cache over the plain loader", ">=", 3.0, "CPU",
           "bench_pipelines.py"),
    Target("dali_gpu_cache_img_s", "DALI GPU from the packed cache, images/s", ">=", 10000.0, GPU,
           "bench_pipelines.py"),
    # start-up at scale (bench_scale.py), extrapolated to RadImageNet's 1.35 million files
    Target("check_peak_mb", "the file check's added peak memory, MB", "<", 100.0, "any", "bench_scale.py"),
    Target("second_start_s_per_million", "a second start from the caches, s per million files", "<", 5.0, "any",
           "bench_scale.py"),
    Target("shard_fraction", "files one rank of 8 reads in a sharded check", "<=", 0.125, "any",
           "bench_scale.py"),
]}

# The training-step cases the step targets read: bench_step.py times them first on a GPU, so a
# time-boxed run that stops early still measures every target.
STEP_TARGET_CASES = [  # (model, crop, grid, batch, arm, setting)
    ("resnet50", 224, 64, 256, "fast", "bf16_cl_graphs"), ("resnet50", 224, 64, 256, "plain", "bf16_cl_graphs"),
    ("resnet50", 224, 64, 256, "authors", "fp32"), ("resnet50", 224, 64, 32, "fast", "bf16_cl_graphs"),
    ("resnet50", 224, 64, 32, "fast", "bf16_cl")]


def table() -> str:
    """The targets as a markdown table."""
    lines = ["| target | figure | needed | on | measured by |", "|---|---|---|---|---|"]
    for t in TARGETS.values():
        lines.append(f"| `{t.name}` | {t.figure} | {t.needed_text} | {t.on} | `bench/{t.bench}` |")
    return "\n".join(lines)


def info(name: str, value) -> dict:
    """A benchmark's ``extra_info`` entries for target ``name`` and its measured ``value``."""
    t = TARGETS[name]
    return {"target": f"{t.needed_text} ({t.on})", "target_met": t.met(value)}
