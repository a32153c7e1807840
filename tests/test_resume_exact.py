"""SIGKILL a training run at a random moment, resume it, and get exactly the uninterrupted run:
every tensor of ``last.pt`` and ``best.pt`` equal (``torch.equal``) and the same epoch records in
``metrics.jsonl``, with two loading workers, for both loaders (plain, DALI on the CPU) and both
mask step implementations.

The killed process runs the CLI under a small driver that sends itself SIGKILL at the N-th
optimiser step (mid-epoch), the N-th switch of a model to eval mode (validation), or the N-th
rename of a finished ``last.pt`` / ``best.pt`` temporary into place (during a checkpoint write).
N is drawn at random; the seed is in every failure message.
"""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgnm_fast.pipelines.sources import open_source
from pgnm_fast.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--global-batch", "8", "--train-crop-size", "16", "--val-resize-size", "18", "--val-crop-size", "16",
       "--grid", "4", "-j", "2", "--epochs", "2", "--print-freq", "1",
       "--threads", "1"]  # both runs sum in the same order (the resumed one keeps the count)

DRIVER = r"""
import os, signal, sys
import torch
kind, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, when=lambda *a: True):
    real = getattr(owner, name)
    def patched(*a, **k):
        if when(*a):
            hit()
        return real(*a, **k)
    setattr(owner, name, patched)

if kind == "step":
    wrap(torch.optim.SGD, "step")
elif kind == "validation":
    wrap(torch.nn.Module, "eval")
else:  # "last.pt" or "best.pt": a finished temporary about to replace the checkpoint
    wrap(os, "replace", lambda src, dst, *a: str(dst).endswith(kind))
from pgnm_fast.cli import main
sys.argv = ["pgnm-fast"] + sys.argv[3:]
main()
"""

# (loader, mask step implementation, where the kill lands): every loader, implementation and
# moment at least once, in four runs; three of them resume from a checkpoint
CASES = [("torch", "reference", "step"), ("dali", "fast", "validation"),
         ("torch", "fast", "last.pt"), ("dali", "reference", "best.pt")]


def _cli(*args, driver=None, check=True):
    cmd = [sys.executable, "-c", DRIVER, *map(str, driver)] if driver else [sys.executable, "-m",
                                                                   "pgnm_fast"]
    p = subprocess.run([*cmd, *map(str, args)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def assert_same(a, b, where=""):
    """Every tensor ``torch.equal``, every other value equal, recursively."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _epochs(run: Path) -> list:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records
            if r["kind"] == "epoch"]


def _calls(kind: str, data: Path) -> tuple[int, int]:
    """The range N is drawn from: events of an uninterrupted two-epoch run after the first
    ``last.pt`` is in place, so that the kill leaves a checkpoint to resume from (two optimiser
    steps, classifier and policy, per batch: the second epoch's; its validation; the second
    ``last.pt`` write). ``best.pt`` is written before ``last.pt``, and only its first write is
    certain: that kill leaves no checkpoint, and the same command starts again."""
    steps = 2 * (len(open_source(data).split("train")) // 8)  # batch 8, last partial dropped
    return {"step": (steps + 1, 2 * steps), "validation": (2, 2), "last.pt": (2, 2),
            "best.pt": (1, 1)}[kind]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("d") / "rin", images=52, seed=2, size=24)


@pytest.mark.slow
@pytest.mark.parametrize("loader,impl,kind", CASES)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(data, tmp_path, loader, impl, kind):
    seed = int.from_bytes(os.urandom(4), "little")
    n = random.Random(seed).randint(*_calls(kind, data))
    why = f"(SIGKILL at {kind} event {n}, seed {seed})"
    args = ["train", "--data", data, *RUN, "--loader", loader, "--impl", impl]
    whole, part = tmp_path / "whole", tmp_path / "part"
    _cli(*args, "--out", whole)
    killed = _cli(*args, "--out", part, driver=[kind, n], check=False)
    assert killed.returncode == -9, killed.stdout + killed.stderr + why
    assert (part / "last.pt").exists() == (kind != "best.pt"), why
    if (part / "last.pt").exists():
        r = _cli("train", "--resume", part / "last.pt", check=False)
        if "already finished" not in r.stdout + r.stderr:
            assert r.returncode == 0, r.stdout + r.stderr + why
    else:  # killed before the first last.pt: the same command starts again
        _cli(*args, "--out", part)
    for name in ("last.pt", "best.pt"):
        a = torch.load(whole / name, weights_only=True)
        b = torch.load(part / name, weights_only=True)
        assert_same(a, b, f"{name} {why}")
    assert _epochs(part) == _epochs(whole), why
    assert not [p.name for p in part.iterdir() if p.name.endswith(".tmp")], why
