"""Start-up at scale: listing and checking many small files, and a second start from the caches.

    python -m pytest bench/bench_scale.py --benchmark-only
    PGNM_SCALE_FILES=200000 python -m pytest bench/bench_scale.py --benchmark-only

Data: a synthetic class-folder set of ``PGNM_SCALE_FILES`` (default 10,000) grey PNGs of 16 x 16
(:mod:`pgnm_fast.synth`), made once under ``$PGNM_FAST_CACHE``; its train split is measured.

- ``listing``: reading the split's folders (no listing cache), per file;
- ``check``: the check of every file (no cached verdict), per file, and the memory it adds at
  its peak: Python allocations (``tracemalloc``, numpy included) and the resident-set high-water
  mark of this process, both above what was held before (the file list); measured at the full
  size and at half of it, and extrapolated along the line through the two (the verdict it
  returns, about 40 bytes a file, is part of it);
- ``second-start``: listing and verdict from the caches (every file's size and time compared),
  per file, beside the time ``os.stat`` alone takes for every file (a bare loop of calls in one
  thread: the floor of a verdict keyed by sizes and times; under torchrun each rank stats its
  shard only) and :func:`~pgnm_fast.pipelines.startup.stat_files` in one thread (it spreads
  the calls over threads from ``STAT_THREADS_FROM`` files);
- ``shard``: the files one rank of 8 reads in a sharded check.

The table printed at the end extrapolates each to RadImageNet's 1.35 million files, beside the
targets of bench/targets.py (the check's added peak memory, a second start per million files, the
share of the files one rank of 8 reads). Targets are reported, not asserted (timings on a shared
host vary).
"""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from targets import TARGETS

from pgnm_fast.pipelines import open_source, startup

FILES = int(os.environ.get("PGNM_SCALE_FILES", "10000"))
RADIMAGENET = 1_350_000
WORLD = 8
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def scale_data(synthetic_folders):
    """(root, train files): the benchmark set, made once in the synthetic-data cache."""
    root = synthetic_folders(f"bench-scale-{FILES}-16px", FILES, 16)
    files = open_source(root).split("train").files
    RESULTS["files"] = len(files)
    return root, files


def _drop_caches(root: Path) -> None:
    shutil.rmtree(startup.cache_folder(root), ignore_errors=True)


def _quiet(*_):
    pass


def test_listing(benchmark, scale_data):
    root, files = scale_data
    benchmark.pedantic(lambda: open_source(root).split("train"), setup=lambda: _drop_caches(root),
                       rounds=3, iterations=1)
    per_file = benchmark.stats.stats.median / len(files)
    RESULTS["listing"] = dict(us_per_file=per_file * 1e6, at_radimagenet_s=per_file * RADIMAGENET)
    benchmark.extra_info.update(files=len(files), **RESULTS["listing"])


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _check_peak(files, root) -> tuple[int, int]:
    """(tracemalloc peak, resident high-water mark) added by one fresh check of ``files``."""
    _drop_caches(root)
    rss_hwm = 0
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's resident high-water mark
        rss_hwm = _vm("VmRSS:")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    startup.checked(files, root, recheck=True, log=_quiet)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    if rss_hwm:
        rss_hwm = _vm("VmHWM:") - rss_hwm
    return peak, rss_hwm


def test_check(benchmark, scale_data):
    root, files = scale_data
    benchmark.pedantic(lambda: startup.checked(files, root, recheck=True, log=_quiet),
                       setup=lambda: _drop_caches(root), rounds=3, iterations=1)
    per_file = benchmark.stats.stats.median / len(files)
    half = files[:len(files) // 2]
    (py_q, rss_q), (py, rss) = _check_peak(half, root), _check_peak(files, root)

    def at(small, big, n):  # along the line through (n/2, small) and (n, big)
        slope = max(0.0, (big - small) / (len(files) - len(half)))
        return big + slope * (n - len(files))
    RESULTS["check"] = dict(us_per_file=per_file * 1e6, at_radimagenet_s=per_file * RADIMAGENET,
                            peak_mb=py / 1e6, rss_peak_mb=rss / 1e6,
                            peak_at_radimagenet_mb=at(py_q, py, RADIMAGENET) / 1e6,
                            rss_peak_at_radimagenet_mb=at(rss_q, rss, RADIMAGENET) / 1e6)
    benchmark.extra_info.update(files=len(files), **RESULTS["check"])


def test_second_start(benchmark, scale_data):
    root, files = scale_data
    _drop_caches(root)
    startup.checked(open_source(root).split("train").files, root, log=_quiet)  # the first start

    def second():
        split = open_source(root).split("train")
        return startup.checked(split.files, split.root, log=_quiet)
    benchmark.pedantic(second, rounds=5, iterations=1)
    per_file = benchmark.stats.stats.median / len(files)
    stat, stat_files_1 = [], []  # the part no cache can save: os.stat of every file (the
    for _ in range(5):          # verdict's key) in a bare loop, and startup's in one thread
        t0 = time.perf_counter()
        collections.deque(map(os.stat, files), maxlen=0)
        stat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        startup.stat_files(files, threads=1)
        stat_files_1.append(time.perf_counter() - t0)
    RESULTS["second-start"] = dict(us_per_file=per_file * 1e6,
                                   stat_us_per_file=sorted(stat)[2] / len(files) * 1e6,
                                   stat_files_1_thread_us_per_file=sorted(stat_files_1)[2]
                                   / len(files) * 1e6,
                                   s_per_million=per_file * 1e6,
                                   at_radimagenet_s=per_file * RADIMAGENET)
    benchmark.extra_info.update(files=len(files), **RESULTS["second-start"])


def test_shard(benchmark, scale_data):
    _root, files = scale_data
    shard = benchmark.pedantic(lambda: startup.check_shard(files, 0, WORLD), rounds=1,
                               iterations=1)
    read = len(shard["redo"])
    RESULTS["shard"] = dict(files_read=read, fraction=read / len(files),
                            at_radimagenet=read / len(files) * RADIMAGENET,
                            s_at_radimagenet=benchmark.stats.stats.median / len(files)
                            * RADIMAGENET)
    benchmark.extra_info.update(files=len(files), world=WORLD, **RESULTS["shard"])


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    yield
    if len(RESULTS) < 2:
        return
    n = RESULTS.get("files", FILES)
    cpus = len(os.sched_getaffinity(0))
    lines = [(f"start-up at scale: the train split's {n} files of 16x16, {cpus} CPUs, "
              f"{time.strftime('%Y-%m-%d')}; extrapolated to {RADIMAGENET:,} files")]
    if "listing" in RESULTS:
        r = RESULTS["listing"]
        lines.append(f"listing        {r['us_per_file']:8.1f} us/file  -> {r['at_radimagenet_s']:7.1f} s")
    if "check" in RESULTS:
        r = RESULTS["check"]
        lines.append(f"check          {r['us_per_file']:8.1f} us/file  -> {r['at_radimagenet_s']:7.1f} s")
        lines.append(f"check peak     {r['peak_mb']:8.1f} MB (Python) {r['rss_peak_mb']:6.1f} MB (RSS)"
                     f" -> {r['peak_at_radimagenet_mb']:6.1f} MB / {r['rss_peak_at_radimagenet_mb']:6.1f}"
                     f" MB   {TARGETS['check_peak_mb'].line(r['peak_at_radimagenet_mb'], ' MB')}")
    if "second-start" in RESULTS:
        r = RESULTS["second-start"]
        lines.append(f"second start   {r['us_per_file']:8.2f} us/file  -> {r['at_radimagenet_s']:7.2f} s"
                     f" ({r['s_per_million']:.2f} s per million; "
                     f"{TARGETS['second_start_s_per_million'].line(r['s_per_million'], ' s')})")
        lines.append(f"  os.stat of every file alone {r['stat_us_per_file']:.2f} us/file; "
                     f"startup.stat_files in one thread {r['stat_files_1_thread_us_per_file']:.2f}"
                     f" us/file (from {startup.STAT_THREADS_FROM:,} files it uses up to 4)")
    if "shard" in RESULTS:
        r = RESULTS["shard"]
        lines.append(f"rank 0 of {WORLD}    reads {r['fraction']:.4f} of the files -> "
                     f"{r['at_radimagenet']:,.0f} files, {r['s_at_radimagenet']:.1f} s "
                     f"({TARGETS['shard_fraction'].line(r['fraction'])})")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))
