"""Benchmarks of the mask step: the fast path (Triton on a GPU, plain torch on the CPU) against the
reference, at the authors' shapes (G = 64, 224 x 224, B = 32 / 64 / 256, 1 and 3 channels).

    python -m pytest bench/bench_kernels.py --benchmark-only [--benchmark-json FILE]

- ``sample_score``: sample + score forward and the backward of sum(S) (the REINFORCE part);
- ``mask_apply``: the masked images from m;
- ``step``: both together, what one training step spends on the mask.
On a GPU also: the apply's achieved bytes/s against a measured device-to-device copy of the same
bytes (CUDA-event timing, L2 flushed, ``triton.testing.do_bench``), and sweeps of the kernels'
launch settings. Images are bfloat16 on a GPU, float32 on the CPU. B = 256 runs on the CPU only
with PGNM_BENCH_FULL=1. ``python bench/bench_kernels.py summarize ...`` turns the JSON into the
record kept under bench/results/ (speed-ups, bandwidth fractions, the targets of bench/targets.py
met or not).
"""
from __future__ import annotations

import os

import pytest
import torch
from targets import TARGETS

from pgnm_fast.kernels import FastMasker, make_masker

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
GRID, CROP = 64, 224
BATCHES = (32, 64, 256) if ON_GPU or os.environ.get("PGNM_BENCH_FULL") else (32, 64)
IMAGE_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

APPLY_CONFIGS = [  # (tile, images per program, warps); the default is (32, 4, 8)
    (32, 4, 8), (32, 2, 8), (32, 8, 8), (32, 4, 4), (64, 2, 16), (64, 4, 8)]
SAMPLE_CONFIGS = [(256, 8), (512, 8), (512, 16), (1024, 16), (1024, 32)]  # (block, warps); default (1024, 16)


def _setup(impl, batch, channels, layout="nchw", masker=None):
    masker = masker or make_masker(impl, GRID, CROP, seed=0).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(batch * 10 + channels)
    a_t = (torch.rand(batch, GRID * GRID, generator=g, device=DEVICE) * 2 - 1).requires_grad_()
    b_t = (torch.rand(batch, GRID * GRID, generator=g, device=DEVICE) * 2 - 1).requires_grad_()
    x = torch.randn(batch, channels, CROP, CROP, generator=g, device=DEVICE).to(IMAGE_DTYPE)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        m, _ = masker.sample_score(a_t.detach(), b_t.detach())
    return masker, a_t, b_t, x, m


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _bench(benchmark, fn, group, **info):
    benchmark.group = group
    benchmark.extra_info.update(info, device=DEVICE, image_dtype=str(IMAGE_DTYPE).replace("torch.", ""))
    fn()  # compile / warm up
    _sync()

    def run():
        fn()
        _sync()
    benchmark(run)


def _sample_score(masker, a_t, b_t):
    _, s = masker.sample_score(a_t, b_t)
    torch.autograd.grad(s.sum(), [a_t, b_t])


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("batch", BATCHES)
def test_sample_score(benchmark, impl, batch):
    masker, a_t, b_t, _, _ = _setup(impl, batch, 1)
    _bench(benchmark, lambda: _sample_score(masker, a_t, b_t), f"sample_score B={batch}",
           op="sample_score", impl=impl, batch=batch, channels=0)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", BATCHES)
def test_mask_apply(benchmark, impl, batch, channels):
    masker, _, _, x, m = _setup(impl, batch, channels)
    _bench(benchmark, lambda: masker.apply(x, m), f"mask_apply B={batch} C={channels}",
           op="mask_apply", impl=impl, batch=batch, channels=channels)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", BATCHES)
def test_step(benchmark, impl, batch, channels):
    """sample + score + backward of S + apply: the mask's share of a training step."""
    masker, a_t, b_t, x, _ = _setup(impl, batch, channels)

    def step():
        m, s = masker.sample_score(a_t, b_t)
        masker.apply(x, m)
        torch.autograd.grad(s.sum(), [a_t, b_t])
    _bench(benchmark, step, f"step B={batch} C={channels}", op="step", impl=impl, batch=batch, channels=channels)


def _bandwidth(masker, x, m):
    from triton.testing import do_bench
    out = torch.empty_like(x)
    apply_ms = do_bench(lambda: masker.apply(x, m), warmup=25, rep=200, return_mode="median")
    copy_ms = do_bench(lambda: out.copy_(x), warmup=25, rep=200, return_mode="median")
    moved = 2 * x.numel() * x.element_size()  # each element read once and written once
    return {"apply_ms": apply_ms, "copy_ms": copy_ms, "bytes": moved,
            "apply_GBps": moved / apply_ms / 1e6, "copy_GBps": moved / copy_ms / 1e6,
            "fraction_of_copy": copy_ms / apply_ms}


@gpu_only
@pytest.mark.parametrize("channels,layout", [(1, "nchw"), (3, "nchw"), (3, "nhwc")])
def test_apply_bandwidth(benchmark, channels, layout):
    """The apply's bandwidth against a copy's (target ``apply_fraction_of_copy``, bench/targets.py)."""
    masker, _, _, x, m = _setup("fast", 256, channels, layout)
    info = _bandwidth(masker, x, m)
    _bench(benchmark, lambda: masker.apply(x, m), f"apply bandwidth C={channels} {layout}", op="apply_bandwidth",
           impl="fast", batch=256, channels=channels, layout=layout, **info)


@gpu_only
@pytest.mark.parametrize("config", APPLY_CONFIGS, ids=lambda c: "tile{}-imgs{}-w{}".format(*c))
@pytest.mark.parametrize("channels,layout", [(1, "nchw"), (3, "nchw"), (3, "nhwc")])
def test_apply_config_sweep(benchmark, config, channels, layout):
    tile, per, warps = config
    masker = FastMasker(GRID, CROP, tile=tile).to(DEVICE)
    masker.apply_launch = {"images_per_program": per, "num_warps": warps}
    masker, _, _, x, m = _setup("fast", 256, channels, layout, masker=masker)
    info = _bandwidth(masker, x, m)
    _bench(benchmark, lambda: masker.apply(x, m), f"apply config C={channels} {layout}", op="apply_config",
           impl="fast", batch=256, channels=channels, layout=layout, tile=tile, images_per_program=per,
           num_warps=warps, **info)


@gpu_only
@pytest.mark.parametrize("config", SAMPLE_CONFIGS, ids=lambda c: "block{}-w{}".format(*c))
@pytest.mark.parametrize("batch", [32, 256])
def test_sample_config_sweep(benchmark, config, batch):
    from triton.testing import do_bench
    block, warps = config
    masker = FastMasker(GRID, CROP).to(DEVICE)
    masker.sample_launch = {"block": block, "num_warps": warps}
    masker, a_t, b_t, _, _ = _setup("fast", batch, 1, masker=masker)
    with torch.no_grad():
        ms = do_bench(lambda: masker.sample_score(a_t.detach(), b_t.detach()), warmup=25, rep=200,
                      return_mode="median")
    _bench(benchmark, lambda: _sample_score(masker, a_t, b_t), f"sample config B={batch}", op="sample_config",
           impl="fast", batch=batch, block=block, num_warps=warps, forward_ms=ms)


# ------------------------------------------------------------------------------------ summary
def summarize(bench_json, validate_json=None, tests_xml=None) -> dict:
    """The record kept under bench/results/: medians, speed-ups, bandwidth and the targets."""
    import json
    import xml.etree.ElementTree as ET
    with open(bench_json) as fh:
        data = json.load(fh)
    rows = [dict(b["extra_info"], median_s=b["stats"]["median"], name=b["name"]) for b in data["benchmarks"]]
    med = {(r["op"], r["impl"], r["batch"], r["channels"]): r["median_s"] for r in rows
           if r["op"] in ("sample_score", "mask_apply", "step")}
    speedups = []
    for (op, impl, batch, channels), t in sorted(med.items()):
        ref = med.get((op, "reference", batch, channels))
        if impl == "fast" and ref:
            speedups.append({"op": op, "batch": batch, "channels": channels, "reference_s": ref, "fast_s": t,
                             "speedup": ref / t})
    on_gpu = data["machine_info"].get("device") == "cuda"
    need = TARGETS["mask_step_speedup" if on_gpu else "mask_step_speedup_cpu"].needed
    steps = [s for s in speedups if s["op"] == "step"]
    targets = {"step_speedup_min": min((s["speedup"] for s in steps), default=None), "step_speedup_needed": need}
    targets["step_speedup_met"] = bool(steps) and all(s["speedup"] >= need for s in steps)
    bw = [r for r in rows if r["op"] == "apply_bandwidth"]
    if bw:
        targets["apply_fraction_of_copy"] = {f"C={r['channels']} {r['layout']}": r["fraction_of_copy"] for r in bw}
        apply_target = TARGETS["apply_fraction_of_copy"]
        targets["apply_fraction_needed"] = apply_target.needed
        targets["apply_bandwidth_met"] = all(apply_target.met(r["fraction_of_copy"]) for r in bw)
    sweeps = {op: sorted((r for r in rows if r["op"] == op), key=lambda r: r["median_s"])
              for op in ("apply_config", "sample_config")}
    record = {"machine_info": data["machine_info"], "datetime": data.get("datetime"), "speedups": speedups,
              "targets": targets, "bandwidth": bw, "sweeps": sweeps,
              "benchmarks": [{k: r[k] for k in r if k != "name"} | {"name": r["name"]} for r in rows]}
    if validate_json and os.path.exists(validate_json):
        with open(validate_json) as fh:
            record["validate"] = json.load(fh)
    if tests_xml and os.path.exists(tests_xml):
        suite = ET.parse(tests_xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        record["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        record["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                     if c.find("failure") is not None or c.find("error") is not None]
    return record


def _main(argv):
    import argparse
    import json
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="bench JSON (+ validate JSON, pytest junit XML) -> results record")
    s.add_argument("bench_json")
    s.add_argument("--validate")
    s.add_argument("--tests")
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    record = summarize(args.bench_json, args.validate, args.tests)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)
    for s_ in record["speedups"]:
        print(f"{s_['op']:<13} B={s_['batch']:<4} C={s_['channels']}  reference {s_['reference_s'] * 1e3:9.3f} ms  "
              f"fast {s_['fast_s'] * 1e3:9.3f} ms  x{s_['speedup']:.1f}")
    print(json.dumps(record["targets"], indent=1))


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
