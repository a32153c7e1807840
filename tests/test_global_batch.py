"""The global batch as the unit of optimisation: each preset stage's global batch and lr for it,
the per-process batch and accumulation resolved for the processes a run has, the lr per image
stated, --lr-base semantics for another global batch, the reward group, a too-long warm-up
shortened, and compare's per-stage plan."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pgnm_fast import self_check as sc
from pgnm_fast.cli import main
from pgnm_fast.compare import make_plan
from pgnm_fast.config import make_config
from pgnm_fast.kernels import FastMasker

AUTHORS_LR_PER_IMAGE = 0.1 / 256  # 8 GPUs x 32 images at lr 0.1
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def printed(*args):
    """(the comment lines, the settings) of ``--print-config``."""
    r = cli(*args, "--print-config")
    assert r.exit_code == 0, r.output
    notes = [ln[2:] for ln in r.output.splitlines() if ln.startswith("# ")]
    return notes, yaml.safe_load(r.output)


def test_paper_preset_on_one_process_is_the_authors_global_batch_and_lr_per_image():
    notes, cfg = printed("train", "--preset", "paper")
    assert cfg["global_batch"] == 256 and cfg["batch_size"] == 256 and cfg["accum_steps"] == 1
    assert cfg["lr"] / cfg["global_batch"] == pytest.approx(AUTHORS_LR_PER_IMAGE)
    assert cfg["reward_group"] == 32  # the authors' per-GPU batch
    assert notes[0] == ("global batch 256 = 256 per process x 1 process x 1 accumulation step; "
                        "lr 0.1 (3.91e-4 per image, the preset's)")
    notes, cfg = printed("train", "--preset", "paper", "-b", "32")
    assert (cfg["batch_size"], cfg["accum_steps"], cfg["lr"]) == (32, 8, 0.1)
    assert notes[0].startswith("global batch 256 = 32 per process x 1 process x 8 accumulation "
                               "steps; lr 0.1 (3.91e-4 per image")
    _, cfg = printed("train", "--preset", "paper", "--accum-steps", "4")
    assert (cfg["batch_size"], cfg["accum_steps"]) == (64, 4)
    _, ft = printed("finetune", "--from", "x.pt", "--preset", "paper")
    assert (ft["global_batch"], ft["batch_size"], ft["lr"]) == (256, 256, 0.001)


def test_another_global_batch_scales_lr_base_and_an_explicit_lr_wins():
    notes, cfg = printed("train", "--preset", "paper", "--global-batch", "64")
    assert cfg["lr"] == pytest.approx(0.025) and cfg["batch_size"] == 64
    assert notes[0].endswith("lr 0.025 (3.91e-4 per image, the preset's)")
    _, cfg = printed("train", "--preset", "paper", "--global-batch", "64", "--lr-base-scale", "sqrt")
    assert cfg["lr"] == pytest.approx(0.05)
    notes, cfg = printed("train", "--preset", "paper", "--global-batch", "64", "--lr", "0.1")
    assert cfg["lr"] == 0.1 and notes[0].endswith("(0.00156 per image, preset 3.91e-4)")


def test_tiny_preset_takes_the_authors_lr_per_image():
    for stage, authors in (("heated", 0.1), ("baseline", 0.1), ("finetune", 0.001)):
        cfg = make_config(stage, "tiny")
        assert cfg.global_batch == 32 and cfg.lr_per_image == pytest.approx(authors / 256)


@pytest.mark.parametrize("args, words", [
    (("-b", "48"), "--global-batch 256 is not --batch-size 48 x 1 process x --accum-steps 5"),
    (("-b", "32", "--accum-steps", "2"), "--global-batch 256 is not --batch-size 32"),
    (("--accum-steps", "3"), "--global-batch 256 is not a whole number"),
    (("-b", "16"), "--reward-group 32 must divide the per-process batch 16"),
])
def test_a_batch_that_does_not_add_up_is_one_error_line(args, words):
    r = cli("train", "--preset", "paper", *args, "--print-config")
    assert r.exit_code != 0
    assert r.output.count("Error") == 1 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_a_warmup_as_long_as_the_run_is_shortened_with_one_line():
    notes, cfg = printed("finetune", "--from", "x.pt", "--epochs", "1")
    assert cfg["lr_warmup_epochs"] == 0
    assert notes[0] == ("--lr-warmup-epochs 1 shortened to 0: a warm-up as long as the 1-epoch "
                         "run would never reach the peak lr")
    lines = []
    cfg = make_config("finetune", "paper", log=lines.append, epochs=5)  # paper's 7 of 10
    assert cfg.lr_warmup_epochs == 4 and len(lines) == 1 and "shortened to 4" in lines[0]
    lines.clear()
    assert make_config("finetune", "tiny", log=lines.append, epochs=2).lr_warmup_epochs == 1
    assert lines == []


def test_compare_plan_gives_every_stage_its_preset_global_batch():
    plan = make_plan("paper", world_size=1)
    for stage in ("heated", "baseline", "finetune"):
        cfg = plan[stage]
        assert (cfg.global_batch, cfg.batch_size, cfg.accum_steps) == (256, 256, 1), stage
    assert plan["finetune"].lr == 0.001 and plan["heated"].lr == plan["baseline"].lr == 0.1
    assert plan["heated"].lr_per_image == plan["baseline"].lr_per_image == AUTHORS_LR_PER_IMAGE
    # the same processes and per-process batch for every stage, each at its own accumulation
    plan = make_plan("paper", dict(batch_size=32), dict(batch_size=32), world_size=1)
    assert [plan[s].accum_steps for s in ("heated", "baseline", "finetune")] == [8, 8, 8]
    assert plan["baseline"].reward_group is None
    plan = make_plan("paper", world_size=8)  # the authors' 8 GPUs
    assert (plan["heated"].batch_size, plan["heated"].accum_steps) == (32, 1)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_split_the_global_batch():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "pgnm_fast", "train", "--preset", "paper", "-b", "32",
                        "--print-config"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    line = ("# global batch 256 = 32 per process x 2 processes x 4 accumulation steps; lr 0.1 "
            "(3.91e-4 per image, the preset's)")
    assert p.stdout.count(line) == 2  # each process resolves the same
    cfg = yaml.safe_load(p.stdout.split("# global batch")[1].split("\n", 1)[1].split("# ")[0])
    assert (cfg["global_batch"], cfg["batch_size"], cfg["accum_steps"]) == (256, 32, 4)


@pytest.mark.slow
def test_a_paper_run_states_its_batch_and_accumulates(small_data, tmp_path):
    """A short run of the paper preset (small model and crops, global batch 64 at the preset's
    lr per image): the start line and the optimiser steps of 2 micro-batches each."""
    out = tmp_path / "paper"
    r = cli("train", "--preset", "paper", "--data", small_data, "--out", out, "--model",
            "resnet10t", "--img-size", "32", "--grid", "8", "--global-batch", "64", "-b", "32",
            "--epochs", "1", "-j", "0", "--impl", "reference", "--print-freq", "2")
    assert r.exit_code == 0, r.output
    assert ("global batch 64 = 32 per process x 1 process x 2 accumulation steps; lr 0.025 "
            "(3.91e-4 per image, the preset's)") in r.output
    assert ("BatchNorm over 32 images at a time; the authors' SyncBatchNorm: the global batch "
            "of 64") in r.output
    assert "reward groups of 32 images (the objective" in r.output
    assert "effective classifier step at the start about log(G^2) x lr = 4.16 x 0.025" in r.output
    assert all(len(ln) <= 120 for ln in r.output.splitlines() if "/" not in ln), r.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["global_batch"], saved["batch_size"], saved["accum_steps"]) == (64, 32, 2)


@pytest.mark.slow
def test_a_failing_fast_path_falls_back_through_the_stage(small_data, tmp_path, monkeypatch):
    """The self-check runs before the stage builds; a failing part falls back with one line and
    config.json records what ran (forced on the CPU, where training does not check)."""
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sc, "CHECKED_DEVICES", ("cuda", "cpu"))
    real = FastMasker.apply
    monkeypatch.setattr(FastMasker, "apply", lambda self, x, m: real(self, x, m) * 1.001)
    out = tmp_path / "fallback"
    r = cli("train", "--data", small_data, "--out", out, "--img-size", "32", "--grid", "8",
            "--epochs", "1", "-j", "0", "--impl", "fast")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("self-check: apply failed")]
    assert len(lines) == 1 and "running with --impl reference" in lines[0]
    assert json.loads((out / "config.json").read_text())["impl"] == "reference"
    assert "reference mask step" in r.output
    # the tiny preset's 1 warm-up epoch of a 1-epoch run: said once the inputs are checked
    assert r.output.count("--lr-warmup-epochs 1 shortened to 0") == 1
    assert json.loads((out / "config.json").read_text())["lr_warmup_epochs"] == 0
    off = tmp_path / "off"
    r = cli("train", "--data", small_data, "--out", off, "--img-size", "32", "--grid", "8",
            "--epochs", "1", "-j", "0", "--impl", "fast", "--no-self-check")
    assert r.exit_code == 0 and "self-check" not in r.output, r.output
    assert json.loads((off / "config.json").read_text())["impl"] == "fast"


def test_a_resumed_run_derives_again_what_a_changed_setting_moves():
    import dataclasses

    from pgnm_fast.batching import rebase
    from pgnm_fast.config import finish
    stored = dataclasses.asdict(make_config("heated", "paper", 1, batch_size=64))  # 64 x 4
    again = finish(rebase(stored, {}, 1), 1)
    assert (again.batch_size, again.accum_steps, again.lr) == (64, 4, 0.1)
    on_two = finish(rebase(stored, {}, 2), 2)  # another number of processes: 128 each
    assert (on_two.batch_size, on_two.accum_steps) == (128, 1)
    smaller = finish(rebase(stored, dict(batch_size=32), 1), 1)
    assert (smaller.batch_size, smaller.accum_steps) == (32, 8)
    half = finish(rebase(stored, dict(global_batch=128), 1), 1)
    assert half.lr == pytest.approx(0.05) and half.lr_per_image == pytest.approx(0.1 / 256)
    kept = finish(rebase(stored, dict(global_batch=128, lr=0.2), 1), 1)
    assert kept.lr == 0.2
