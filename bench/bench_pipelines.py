"""Pipeline benchmarks: images/s delivered to the trainer, batch 256, 224 x 224 train crops.

    python -m pytest bench/bench_pipelines.py --benchmark-only

Paths (every one with the train transform: random resized crop, flip, normalise, float32):

- ``torch-png``: the plain PyTorch loader on the PNG files (the baseline), one worker process
  per CPU;
- ``torch-cache``: the plain loader reading the packed cache;
- ``dali-cpu-png`` / ``dali-cpu-cache``: the DALI CPU-only variant, one thread per CPU;
- ``dali-gpu-png`` / ``dali-gpu-cache``: the DALI GPU variant, batches on the GPU (skipped
  without CUDA or DALI).

And the DALI CPU train graph from PNG taken apart, to show where its time goes and what the
best any DALI CPU graph of these operators can deliver here: the encoded files held in memory and
fed as they are (no file reading, no Python work per image), one thread per CPU, run up to
``dali-mem-decode`` (``decoders.image``), up to ``dali-mem-resize`` (``decoders.image_slice``
of the random crop, then ``resize``) and ``dali-mem-all`` (then ``crop_mirror_normalize``: the
train graph itself).

Data: a synthetic RadImageNet-like set of 224 x 224 grey PNGs (:mod:`pgnm_fast.synth`, class
folders), made once under ``$PGNM_FAST_CACHE`` and packed once beside it. A round is one epoch
of the train split after a warm-up epoch (worker processes and pipelines started); the table
printed at the end gives the median images/s per path and its ratio to ``torch-png``, and the
CPU time spent per image (this process and its worker processes, from ``/proc``): on a host
shared with other jobs images/s drifts with the load, CPU time per image much less, and on an
idle host whose cores every path keeps busy the two ratios agree. Each benchmark's
``extra_info`` holds the same numbers. The targets of bench/targets.py are printed beside them;
they are reported, not asserted, because timings on a shared host vary.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from targets import TARGETS

from pgnm_fast.pipelines import make_loader, open_source
from pgnm_fast.pipelines.dali import dali_available
from pgnm_fast.pipelines.pack import MANIFEST, pack
from pgnm_fast.synth import cache_dir, make_synthetic

IMAGES, SIZE, BATCH, CROP = 3900, 224, 256, 224
CPUS = len(os.sched_getaffinity(0))
PATHS = ["torch-png", "torch-cache", "dali-cpu-png", "dali-cpu-cache", "dali-gpu-png",
         "dali-gpu-cache"]
STAGES = ["decode", "resize", "all"]
RESULTS: dict[str, float] = {}
CPU_MS: dict[str, float] = {}


def _tree_cpu() -> float:
    """CPU seconds of this process and its children so far (Linux /proc; 0 elsewhere)."""
    me, total = os.getpid(), 0.0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, names):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / hz
    return total


def _quiet(*_):
    pass


@pytest.fixture(scope="session")
def bench_data():
    """(PNG root, cache) of the benchmark set, made once and kept in the synthetic-data cache."""
    base = cache_dir() / f"bench-pipelines-v1-n{IMAGES}-{SIZE}px"
    root, cache = base / "png", base / "cache"
    if not (root / "pgnm_fast_synth.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".png.tmp-", dir=base))
        make_synthetic(tmp / "png", images=IMAGES, seed=1, size=SIZE, layout="folders")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp / "png", root)
        shutil.rmtree(tmp, ignore_errors=True)
    if not (cache / MANIFEST).is_file():
        shutil.rmtree(cache, ignore_errors=True)
        pack(root, cache, log=_quiet)
    return root, cache


def _loader(path: str, root, cache):
    backend, *rest = path.split("-")
    device = None
    if backend == "dali":
        if not dali_available():
            pytest.skip("DALI is not installed")
        if rest[0] == "gpu":
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device")
            device = "cuda"
    data = cache if rest[-1] == "cache" else root
    split = open_source(data).split("train")
    return make_loader(split, train=True, batch_size=BATCH, crop_size=CROP, workers=CPUS,
                       seed=0, rank=0, world_size=1, device=device, backend=backend,
                       log=_quiet), device  # as the trainer builds them (eager)


def _epoch(loader, device) -> int:
    n = 0
    for _images, labels in loader:
        n += labels.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return n


@pytest.mark.parametrize("path", PATHS)
def test_images_per_second(benchmark, bench_data, path):
    loader, device = _loader(path, *bench_data)
    n = _epoch(loader, device)  # warm-up: start workers / build pipelines
    assert n == len(loader) * BATCH > 0
    cpu = []

    def epoch():
        c0 = _tree_cpu()
        _epoch(loader, device)
        cpu.append((_tree_cpu() - c0) / n * 1e3)

    benchmark.pedantic(epoch, rounds=5, iterations=1)
    rate = n / statistics.median(benchmark.stats.stats.data)
    RESULTS[path], CPU_MS[path] = rate, statistics.median(cpu)
    benchmark.extra_info.update(images_per_epoch=n, images_per_s=round(rate, 1),
                                cpu_ms_per_image=round(CPU_MS[path], 3),
                                device=torch.cuda.get_device_name() if device else
                                f"{CPUS}-core CPU")
    if "torch-png" in RESULTS:
        benchmark.extra_info["x_plain_loader"] = round(rate / RESULTS["torch-png"], 2)


def _stage_pipeline(files, stage: str):
    """The DALI CPU train graph over ``files`` (bytes in memory), run up to ``stage``."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    from pgnm_fast.pipelines import check
    from pgnm_fast.pipelines.transforms import random_resized_crop_params
    scan = check.scan(files)
    assert (scan.kind == check.GREY8).all()
    encoded = [np.fromfile(f, dtype=np.uint8) for f in files]
    rng, state = np.random.default_rng(0), {"k": 0}

    def feed():  # the next batch, cycling over the files, with fresh crops and flips
        idx = (state["k"] * BATCH + np.arange(BATCH)) % len(files)
        state["k"] += 1
        top, left, h, w = random_resized_crop_params(scan.height[idx], scan.width[idx], rng)
        return ([encoded[i] for i in idx], np.stack([top, left], 1).astype(np.int32),
                np.stack([h, w], 1).astype(np.int32), (rng.random(BATCH) < 0.5).astype(np.int32))

    @pipeline_def(batch_size=BATCH, num_threads=CPUS, device_id=None, prefetch_queue_depth=2)
    def graph():
        data, anchor, shape, mirror = fn.external_source(
            source=feed, num_outputs=4, batch=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32])
        if stage == "decode":
            return fn.decoders.image(data, device="cpu", output_type=types.GRAY)
        images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", device="cpu",
                                         output_type=types.GRAY)
        images = fn.resize(images, size=[CROP, CROP], antialias=True)
        if stage == "resize":
            return images
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[0.5 * 255], std=[0.25 * 255], mirror=mirror)

    pipe = graph()
    with warnings.catch_warnings():  # "decode" leaves the crop and flip outputs unused
        warnings.simplefilter("ignore")
        pipe.build()
    return pipe


@pytest.mark.parametrize("stage", STAGES)
def test_dali_cpu_stages(benchmark, bench_data, stage):
    if not dali_available():
        pytest.skip("DALI is not installed")
    split = open_source(bench_data[0]).split("train")
    pipe = _stage_pipeline(split.files, stage)
    batches = len(split) // BATCH
    for _ in range(2 * 2):  # warm-up, and the prefetch queue filled
        pipe.run()
    cpu = []

    def epoch():
        c0 = _tree_cpu()
        for _ in range(batches):
            pipe.run()
        cpu.append((_tree_cpu() - c0) / (batches * BATCH) * 1e3)

    benchmark.pedantic(epoch, rounds=5, iterations=1)
    name = f"dali-mem-{stage}"
    rate = batches * BATCH / statistics.median(benchmark.stats.stats.data)
    RESULTS[name], CPU_MS[name] = rate, statistics.median(cpu)
    benchmark.extra_info.update(images_per_s=round(rate, 1), cpu_ms_per_image=round(CPU_MS[name], 3))


# each path's target (bench/targets.py): a ratio over the plain loader, or images/s
PATH_TARGETS = {"dali-cpu-png": ("dali_cpu_png_over_plain", "ratio"),
                "dali-cpu-cache": ("dali_cpu_cache_over_plain", "ratio"),
                "dali-gpu-cache": ("dali_gpu_cache_img_s", "rate")}


def _target(path, rate, base):
    if path not in PATH_TARGETS:
        return ""
    name, kind = PATH_TARGETS[path]
    value = rate if kind == "rate" else (rate / base if base else None)
    return TARGETS[name].line(value, "x" if kind == "ratio" else " img/s")


@pytest.fixture(scope="session", autouse=True)
def _table(request):
    yield
    if not RESULTS:
        return
    base = RESULTS.get("torch-png")
    lines = [f"pipelines, batch {BATCH}, {CROP}x{CROP} train crops, {SIZE}px PNG sources, "
             f"{CPUS} CPUs, {time.strftime('%Y-%m-%d')}",
             f"{'path':16} {'images/s':>10} {'x plain':>8} {'CPU ms/img':>11} {'x plain':>8}"]
    cbase = CPU_MS.get("torch-png")
    for path in PATHS + [f"dali-mem-{s}" for s in STAGES]:
        if path in RESULTS:
            ratio = f"{RESULTS[path] / base:8.2f}" if base else f"{'-':>8}"
            cratio = f"{cbase / CPU_MS[path]:8.2f}" if cbase and CPU_MS[path] else f"{'-':>8}"
            lines.append(f"{path:16} {RESULTS[path]:10.0f} {ratio} {CPU_MS[path]:11.3f} "
                         f"{cratio}  {_target(path, RESULTS[path], base)}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))
