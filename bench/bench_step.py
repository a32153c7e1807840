"""Images/s of one whole training step: forward, backward, both optimiser steps and the policy's
EMA, on synthetic batches already on the device (no loader is timed).

    python -m pytest bench/bench_step.py --benchmark-only [--bench-device cpu|cuda]

Arms (``arm``): ``plain`` (engine.PlainStep, no policy), ``reference`` and ``fast``
(engine.HeatedStep with ``--impl reference`` / the fused kernels) and ``authors``
(:class:`AuthorsStep`: the published training step transcribed in plain torch, fp32, eager).
Settings (``setting``): ``fp32`` eager, ``bf16`` autocast, ``bf16_cl`` (+ channels-last),
``bf16_cl_graphs`` (+ the step replayed as a CUDA graph, graphs.GraphedStep, the batch in the
graph's static input tensors as the DALI loader hands it), ``bf16_cl_compile`` (torch.compile of
classifier and policy). Classifiers resnet10t, resnet18, resnet50, policy resnet10t, one grey
channel. On a GPU: crop 224, grid 64, batch 32 and 256, peak device memory per arm. On the CPU:
crop 64, grid 16, batch 16, resnet10t, fp32 with and without channels-last; ``PGNM_BENCH_FULL=1``
adds resnet50 at 224 x 224, grid 64, batch 4. cuDNN's autotuning (``cudnn.benchmark``, which the
trainer turns on) is left as torch sets it (off): each case's ``extra_info`` records it.

Each timed round runs several steps, then waits for the device. The ratios (fused vs the authors'
way, heated vs plain, graphs vs eager) go into each benchmark's ``extra_info`` and the JSON's
``step_ratios``, and are printed at the end of the session. ``PGNM_BENCH_ROWS=FILE`` also appends
each case's figures to FILE (one JSON line) as the case ends: pytest-benchmark writes its JSON at
the end of the session only, so a session stopped at a time-box keeps what it measured.
"""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch
import torch.nn.functional as F
from targets import STEP_TARGET_CASES

from pgnm_fast.engine import N_STATS, HeatedStep, PlainStep
from pgnm_fast.graphs import GraphedStep
from pgnm_fast.kernels import make_masker
from pgnm_fast.kernels.reference import BLUR_KERNEL_SIZE, BLUR_SIGMA
from pgnm_fast.models import PolicyNet, create_model
from pgnm_fast.speed import compile_blocked, compile_modules, sgd_kind

CLASSES = 13
POLICY = "resnet10t"
GPU_SETTINGS = ("fp32", "bf16", "bf16_cl", "bf16_cl_graphs", "bf16_cl_compile")
SETTINGS_OF = {  # which settings each arm is timed with on a GPU
    "plain": GPU_SETTINGS, "fast": GPU_SETTINGS, "reference": ("fp32", "bf16_cl"),
    "authors": ("fp32",)}  # the authors' way is fp32 eager by definition


def cases(device: str, full: bool = False) -> list[tuple]:
    """(model, crop, grid, batch, arm, setting) for a device: on a GPU the targets' cases first,
    compile cases last (they compile)."""
    quick = bool(os.environ.get("PGNM_BENCH_QUICK"))  # bench/run_gpu.sh --quick
    if device == "cuda" and quick:
        return [("resnet18", 224, 64, 32, arm, setting) for arm in SETTINGS_OF
                for setting in ("fp32", "bf16_cl_graphs", "bf16_cl_compile")
                if setting in SETTINGS_OF[arm]]
    if device == "cuda":
        out = [(model, 224, 64, batch, arm, setting)
               for model in ("resnet10t", "resnet18", "resnet50") for batch in (32, 256)
               for arm, settings in SETTINGS_OF.items() for setting in settings
               if setting != "bf16_cl_compile"]
        out = STEP_TARGET_CASES + [c for c in out if c not in STEP_TARGET_CASES]
        out += [("resnet50", 224, 64, 256, arm, "bf16_cl_compile") for arm in ("plain", "fast")]
        return out
    if quick:
        return [("resnet10t", 32, 8, 8, arm, "fp32") for arm in SETTINGS_OF]
    sizes = [("resnet10t", 64, 16, 16)] + ([("resnet50", 224, 64, 4)] if full else [])
    return [(model, crop, grid, batch, arm, setting) for model, crop, grid, batch in sizes
            for arm in ("plain", "reference", "fast", "authors")
            for setting in (("fp32", "fp32_cl") if arm in ("plain", "fast") else ("fp32",))]


class AuthorsStep:
    """The published step (docs/method.md §3-4 and §7) transcribed in plain torch: the policy's
    heads evaluated twice (once for a~ and b~, once more for the base update), torch.distributions'
    Beta (argument validation on, as by default) for the sample and log p, ``log(sum(exp()))``,
    nearest upsampling, a 13 x 13 Gaussian conv blur with reflect padding whose kernel is built
    every step, fp32, eager, the loss read on the host every step (its metric logger). The bases
    stay on the device here (the published code keeps them on the CPU)."""

    def __init__(self, model, policy, optimizer, policy_optimizer, crop: int):
        self.model, self.policy, self.crop = model, policy, crop
        self.optimizers = (optimizer, policy_optimizer)
        self.base_alpha = policy.base_alpha.clone()
        self.base_beta = policy.base_beta.clone()

    def _blur(self, x):
        k, sigma = BLUR_KERNEL_SIZE, BLUR_SIGMA
        t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
        pdf = torch.exp(-0.5 * (t / sigma) ** 2)
        k1 = pdf / pdf.sum()
        kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, k, k)
        x = F.pad(x, [k // 2] * 4, mode="reflect")
        return F.conv2d(x, kernel, groups=x.shape[1])

    def __call__(self, images, target, stats):
        p = self.policy
        feats = p.fe(images)
        a_tilde = 0.9 * self.base_alpha + 0.1 * p.alpha(feats)
        b_tilde = 0.9 * self.base_beta + 0.1 * p.beta(feats)
        self.base_alpha = 0.99 * self.base_alpha + 0.01 * torch.mean(p.alpha(feats).detach(), 0, keepdim=True)
        self.base_beta = 0.99 * self.base_beta + 0.01 * torch.mean(p.beta(feats).detach(), 0, keepdim=True)
        dist = torch.distributions.Beta(torch.exp(a_tilde), torch.exp(b_tilde))
        m = dist.sample()
        grid = round(m.shape[1] ** 0.5)
        mask = F.interpolate(m.reshape(-1, 1, grid, grid), (self.crop, self.crop))
        logits = self.model(images * self._blur(mask))
        logp = dist.log_prob(m)
        loss = torch.mean(torch.log(torch.sum(logp.exp(), 1)) * F.cross_entropy(logits, target))
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        loss.item()


def build_step(model_name, crop, grid, batch, arm, setting, device, log=lambda *_: None):
    """(step, images, target, stats) for one case, from the trainer's own classes."""
    dev = torch.device(device)
    torch.manual_seed(0)
    layout = torch.channels_last if "_cl" in setting else torch.preserve_format
    amp = setting.startswith("bf16")
    model = create_model(model_name, CLASSES, in_chans=1).to(dev, memory_format=layout)
    # the trainer's SGD (fused on CUDA, foreach on the CPU); the authors' way: torch's default
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=1e-4, **({} if arm == "authors" else sgd_kind(dev)))
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    policy = policy_optimizer = None
    if arm != "plain":
        policy = PolicyNet(grid=grid, in_chans=1, trunk=POLICY).to(dev, memory_format=layout)
        policy_optimizer = torch.optim.SGD(policy.parameters(), **dict(sgd, lr=0.001))
    if setting.endswith("_compile"):
        compile_modules([model, policy], dev, log)
    if arm == "plain":
        step = PlainStep(model, optimizer, amp, dev)
    elif arm == "authors":
        step = AuthorsStep(model, policy, optimizer, policy_optimizer, crop)
    else:
        masker = make_masker(arm, grid, crop, seed=0).to(dev)
        step = HeatedStep(model, policy, masker, optimizer, policy_optimizer, amp, dev)
    images = torch.randn(batch, 1, crop, crop, device=dev).contiguous(memory_format=layout)
    target = torch.randint(0, CLASSES, (batch,), device=dev)
    if setting.endswith("_graphs"):
        step = GraphedStep(step, [o for o in (optimizer, policy_optimizer) if o is not None],
                           warmup=3, static_inputs=True, log=log)
    return step, images, target, torch.zeros(N_STATS, device=dev)


# ---------------------------------------------------------------------------------- ratios
def _key(info, **change):
    info = dict(info, **change)
    return (info["model"], info["crop"], info["batch"], info["arm"], info["setting"])


def ratios(rows) -> list[dict]:
    """Speed ratios between arms of the same model, crop and batch. ``rows``: (extra_info,
    median seconds per step). Each ratio is (time of the other) / (time of this): > 1 is faster."""
    times = {_key(info): t for info, t in rows}
    out = []
    for info, t in rows:
        arm, setting = info["arm"], info["setting"]
        pairs = []
        if arm in ("fast", "reference"):
            pairs.append(("vs_authors", _key(info, arm="authors", setting="fp32")))
            pairs.append(("heated_over_plain", _key(info, arm="plain")))
        if arm == "fast":
            pairs.append(("vs_reference", _key(info, arm="reference")))
        if setting.endswith("_graphs"):
            pairs.append(("graphs_vs_eager", _key(info, setting=setting[: -len("_graphs")])))
        if setting.endswith("_compile"):
            pairs.append(("compile_vs_eager", _key(info, setting=setting[: -len("_compile")])))
        if setting == "fp32_cl":
            pairs.append(("channels_last_vs_nchw", _key(info, setting="fp32")))
        for name, other in pairs:
            if other in times:
                r = t / times[other] if name == "heated_over_plain" else times[other] / t
                out.append({"ratio": name, "model": info["model"], "crop": info["crop"],
                            "batch": info["batch"], "arm": arm, "setting": setting, "value": r})
    return out


def format_ratios(rs) -> list[str]:
    words = {"vs_authors": "x the authors' way (fp32 eager)", "vs_reference": "x the reference",
             "heated_over_plain": "x the plain step's time", "graphs_vs_eager": "x eager",
             "compile_vs_eager": "x eager", "channels_last_vs_nchw": "x NCHW"}
    return [f"{r['model']:<10} {r['crop']:>3}px B={r['batch']:<4} {r['arm']:<9} {r['setting']:<16} "
            f"{r['value']:6.2f} {words[r['ratio']]}" for r in rs]


MEASURED: list[tuple[dict, float]] = []  # this session's (extra_info, median s/step), for the summary


# ---------------------------------------------------------------------------------- benchmark
def _device(config) -> str:
    return config.getoption("--bench-device")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = _device(metafunc.config)
        cs = cases(device, full=bool(os.environ.get("PGNM_BENCH_FULL")))
        metafunc.parametrize("case", cs, ids=[f"{m}-{c}px-b{b}-{a}-{s}" for m, c, g, b, a, s in cs])


def test_step(benchmark, case, request):
    model_name, crop, grid, batch, arm, setting = case
    device = _device(request.config)
    on_gpu = device == "cuda"
    if setting.endswith("_compile") and compile_blocked(torch.device(device)):
        pytest.skip(f"--compile: {compile_blocked(torch.device(device))}")
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    notes = []
    step, images, target, stats = build_step(*case, device, log=notes.append)
    per_round = 5 if on_gpu else 1

    def run():
        for _ in range(per_round):
            step(images, target, stats)
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(2 if on_gpu else 1):  # warm-up; --graphs: 3 eager steps, capture, replays
        run() if on_gpu else step(images, target, stats)
    if isinstance(step, GraphedStep) and step.captures == 0:
        pytest.fail(f"the step was not captured as a CUDA graph: {notes}")
    benchmark.group = f"step {model_name} {crop}px B={batch}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median / per_round
    info = {"op": "train_step", "model": model_name, "policy": POLICY if arm != "plain" else None,
            "crop": crop, "grid": grid, "batch": batch, "arm": arm, "setting": setting,
            "device": device, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "seconds_per_step": seconds, "img_s": batch / seconds,
            "peak_mem_MiB": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None}
    benchmark.extra_info.update(info)
    MEASURED.append((info, seconds))
    if os.environ.get("PGNM_BENCH_ROWS"):  # each case as it ends: a session stopped later keeps it
        s = benchmark.stats.stats
        with open(os.environ["PGNM_BENCH_ROWS"], "a") as fh:
            fh.write(json.dumps({"extra_info": info, "stats": {"median": s.median, "q1": s.q1, "q3": s.q3,
                                                               "rounds": s.rounds}}) + "\n")
