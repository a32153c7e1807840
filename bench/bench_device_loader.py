"""The device-resident loader (``--loader device``): train images/s of 224 x 224 augmentation
(RandomResizedCrop, flip, normalise) from a cache held in memory, batch 256.

    PGNM_BENCH_THREADS=1 python -m pytest bench/bench_device_loader.py --benchmark-only

Paths:

- ``device``: :class:`~pgnm_fast.pipelines.device.DeviceLoader` over the packed train split
  (on a GPU: the Triton kernel, the cache in GPU memory; on the CPU: torch's uint8
  antialiased resize, one image per task over a pool of one thread per CPU, the cache in host
  memory), float32 NCHW;
- ``device-bf16-cl`` (GPU only): bf16 channels-last into static buffers, the step's form under
  ``--graphs --amp``; ``test_captured_fill_images_per_second`` (GPU only): the same batches
  filled by replays of a CUDA graph holding the loader's fill, as ``--graphs`` runs it;
- ``torch-cache``: the plain PyTorch loader on the same cache (one worker process per CPU,
  each with one torch thread, PIL's resize), the CPU reference.

Both CPU paths use every CPU: the device path's resize threads are one per CPU whatever
``PGNM_BENCH_THREADS`` says (that setting only sets the torch threads of this process, which
the device path uses for its batched normalisation), and the plain loader has one worker
process per CPU.

A round is one epoch after a warm-up epoch (its crop plan drawn on the host included; the
steady rate of the batches alone, what a long epoch approaches, is in ``extra_info``). On a
machine shared with other jobs the rate of a path drifts with the load, so the paths run in
alternation and ``test_device_vs_plain_loader`` reports the ratio device / plain of each round
(median and range), which the load affects much less than either rate, and the CPU time each
path spends per image (this process and the plain loader's worker processes, from ``/proc``):
under load a path with more processes gets more of the machine, CPU time per image does not
depend on that. On a GPU, ``test_data_path_share_of_a_resnet50_step`` times one batch's
augmentation (the counter-driven fill that ``--graphs`` captures with the step) against a
resnet50 forward + backward + SGD step at batch 256 (bf16 autocast, channels-last): the
heated step does that and more, so the printed share is an upper bound of the data path's
share of it.

Targets (bench/targets.py; reported, not asserted): ``device_over_plain_loader`` on the CPU,
``device_loader_img_s`` and ``data_path_share`` on a GPU.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch
from bench_pipelines import _tree_cpu
from targets import info as target_info

from pgnm_fast.pipelines import open_source
from pgnm_fast.pipelines.device import DeviceLoader
from pgnm_fast.pipelines.loader import build_cached_loader
from pgnm_fast.pipelines.pack import MANIFEST, pack
from pgnm_fast.synth import cache_dir, make_synthetic

IMAGES, SIZE, BATCH, CROP = 1300, 224, 256, 224
CPUS = len(os.sched_getaffinity(0))
CUDA = torch.cuda.is_available()
RESULTS: dict[str, float] = {}


def _quiet(*_):
    pass


@pytest.fixture(scope="session")
def bench_cache():
    """A packed synthetic set of 224 x 224 grey images, made once in the synthetic-data cache."""
    base = cache_dir() / f"bench-device-v1-n{IMAGES}-{SIZE}px"
    cache = base / "cache"
    if not (cache / MANIFEST).is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
        make_synthetic(tmp / "png", images=IMAGES, seed=1, size=SIZE, layout="folders")
        shutil.rmtree(cache, ignore_errors=True)
        pack(tmp / "png", cache, log=_quiet)
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _device_loader(cache, **kw):
    return DeviceLoader(open_source(cache).split("train"), train=True, batch_size=BATCH,
                        crop_size=CROP, device="cuda" if CUDA else None,
                        threads=None if CUDA else CPUS, **kw)


def _epoch(loader) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for _, labels in loader:
        n += labels.shape[0]
    if CUDA:
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


@pytest.mark.parametrize("path", ["device", "device-bf16-cl"])
def test_images_per_second(benchmark, bench_cache, path):
    if path != "device" and not CUDA:
        pytest.skip("bf16 channels-last static buffers: the step's form on a GPU")
    extra = dict(dtype=torch.bfloat16, channels_last=True, static=True) if path != "device" \
        else {}
    loader = _device_loader(bench_cache, **extra)
    n, _ = _epoch(loader)  # warm-up (Triton compiles, caches fill)
    benchmark.pedantic(lambda: _epoch(loader), rounds=5, iterations=1)
    rate = n / statistics.median(benchmark.stats.stats.data)
    RESULTS[path] = rate
    # the steady state of a long epoch: batches of one plan, its (per-epoch) drawing left out
    plan, steps = loader.plan_epoch(), len(loader)
    reps = 20 if CUDA else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        for b in range(steps):
            loader.batch(plan, b * BATCH, BATCH)
    if CUDA:
        torch.cuda.synchronize()
    steady = reps * steps * BATCH / (time.perf_counter() - t0)
    benchmark.extra_info.update(images_per_epoch=n, images_per_s=round(rate, 1),
                                batches_only_images_per_s=round(steady, 1),
                                device=torch.cuda.get_device_name() if CUDA else
                                f"CPU, {torch.get_num_threads()} torch threads",
                                **(target_info("device_loader_img_s", rate) if CUDA else {}))
    print(f"\n{path}: {rate:,.0f} images/s per epoch of {n}, {steady:,.0f} images/s in its "
          f"batches (the per-epoch plan left out)")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_captured_fill_images_per_second(benchmark, bench_cache):
    """The train data path as ``--graphs`` runs it: the loader's counter-driven fill (bf16
    channels-last) captured once in a CUDA graph, replayed once per batch of an epoch."""
    loader = _device_loader(bench_cache, dtype=torch.bfloat16, channels_last=True, static=True)
    loader.defer_fill()
    next(iter(loader))
    for _ in range(3):  # Triton compiles, the allocator warms
        loader.fill()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loader.fill()
    steps = len(loader)

    def epoch():
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()

    epoch()
    benchmark.pedantic(epoch, rounds=5, iterations=1)
    rate = steps * BATCH / statistics.median(benchmark.stats.stats.data)
    RESULTS["device-graphed"] = rate
    benchmark.extra_info.update(images_per_s=round(rate, 1), device=torch.cuda.get_device_name(),
                                **target_info("device_loader_img_s", rate))
    print(f"\ncaptured fill: {rate:,.0f} images/s ({steps} replays of batch {BATCH})")


def test_device_vs_plain_loader(benchmark, bench_cache):
    """Alternating epochs of the device loader and the plain loader over the same cache; the
    ratio of each pair, median and range (module docstring)."""
    device = _device_loader(bench_cache)
    plain = build_cached_loader(open_source(bench_cache).split("train"), train=True,
                                batch_size=BATCH, crop_size=CROP, workers=CPUS)
    _epoch(device), _epoch(plain)  # warm-up: worker processes started
    ratios, rates, cpu = [], [], []

    def pair():
        c0 = _tree_cpu()
        n, td = _epoch(device)
        c1 = _tree_cpu()
        m, tp = _epoch(plain)
        cpu.append(((c1 - c0) / n * 1e3, (_tree_cpu() - c1) / m * 1e3))
        rates.append((n / td, m / tp))
        ratios.append((n / td) / (m / tp))

    benchmark.pedantic(pair, rounds=5, iterations=1)
    med = statistics.median(ratios)
    benchmark.extra_info.update(
        ratio_median=round(med, 2), ratio_min=round(min(ratios), 2),
        ratio_max=round(max(ratios), 2),
        device_images_per_s=[round(a, 1) for a, _ in rates],
        plain_images_per_s=[round(b, 1) for _, b in rates], plain_workers=CPUS,
        device_cpu_ms_per_image=[round(a, 2) for a, _ in cpu],
        plain_cpu_ms_per_image=[round(b, 2) for _, b in cpu],
        **target_info("device_over_plain_loader", med))
    print(f"\ndevice / plain loader, {len(ratios)} alternating epochs: median {med:.2f}, range "
          f"{min(ratios):.2f}-{max(ratios):.2f} (device "
          f"{statistics.median(a for a, _ in rates):,.0f}, plain "
          f"{statistics.median(b for _, b in rates):,.0f} images/s; CPU time per image: device "
          f"{statistics.median(a for a, _ in cpu):.2f} ms, plain "
          f"{statistics.median(b for _, b in cpu):.2f} ms)")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_data_path_share_of_a_resnet50_step(benchmark, bench_cache):
    from pgnm_fast.models import create_model
    loader = _device_loader(bench_cache, dtype=torch.bfloat16, channels_last=True, static=True)
    loader.defer_fill()  # the data path as --graphs runs it: the counter-driven fill
    images, labels = next(iter(loader))
    model = create_model("resnet50", num_classes=165, in_chans=1).cuda().to(
        memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader.fill()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    t_data = timed(loader.fill, 50)  # past the epoch's last batch the counter wraps
    benchmark.pedantic(lambda: timed(step, 10), rounds=3, iterations=1)
    t_step = timed(step, 10)
    share = t_data / t_step
    benchmark.extra_info.update(data_ms=round(t_data * 1e3, 3), step_ms=round(t_step * 1e3, 2),
                                share=round(share, 4),
                                **target_info("data_path_share", share))
    print(f"\ndata path {t_data * 1e3:.2f} ms per batch of {BATCH}, resnet50 step "
          f"{t_step * 1e3:.1f} ms: {100 * share:.2f}% (upper bound for the heated step)")
