"""The stages end to end through the CLI, on a small synthetic set (CPU, seconds each)."""
import json

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.metrics import METRIC_KEYS
from pgnm_fast.run_state import load_checkpoint
from pgnm_fast.synth import make_synthetic

SMALL = ["--epochs", "2", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=240, seed=11, size=40)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_heated_stage_writes_run_folder_and_logs(data, tmp_path):
    out = tmp_path / "heated"
    r = cli("train", "--data", data, "--out", out, "--grid", "8", "--impl", "reference", *SMALL)
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"last.pt", "best.pt", "metrics.jsonl", "config.json",
                                               "curves.png", "masks.png", "masks.npz", "confusion.png",
                                               "confusion.csv", "per_class.csv"}
    last = load_checkpoint(out / "last.pt")
    assert last["stage"] == "heated" and last["epoch"] == 1 and "policy" in last
    assert set(last["val_metrics"]) == set(METRIC_KEYS)
    steps, epochs = records(out, "step"), records(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert steps[-1]["step"] == last["step"] and all(s["S"] > 0 for s in steps)
    assert "policy_lr" in steps[0] and "heated stage done" in r.output
    # whether the policy moves: the spread of its masks and its gradient norm, every record
    for record in steps + epochs:
        prefix = "train_" if record["kind"] == "epoch" else ""
        spread, norm = record[prefix + "mask_spread"], record[prefix + "policy_grad_norm"]
        assert 0 <= spread < 0.5 and 0 < norm < float("inf"), record
    assert len({s["mask_spread"] for s in steps}) > 1 and len({s["policy_grad_norm"] for s in steps}) > 1
    assert "val images from " in r.output and " through DALI (CPU)" in r.output  # DALI is installed
    # the policy's base buffers moved by the EMA during training
    base = last["policy"]["base_alpha"]
    assert base.shape == (1, 64) and not torch.equal(base, torch.zeros_like(base))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_interrupted_run_resumes_from_its_step_and_matches_an_uninterrupted_run(
        data, tmp_path, ctrl_c_in_epoch, impl):
    common = ["--data", data, "--grid", "8", "--impl", impl, *SMALL]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli("train", "--out", whole, *common).exit_code == 0
    disarm = ctrl_c_in_epoch(1)
    first = cli("train", "--out", part, *common)
    assert first.exit_code != 0  # interrupted: click reports "Aborted!"
    disarm()
    one = load_checkpoint(part / "last.pt")
    assert one["epoch"] == 0
    r = cli("train", "--resume", part / "last.pt")
    assert r.exit_code == 0, r.output
    assert "resumed from epoch 0" in r.output
    resumed, full = load_checkpoint(part / "last.pt"), load_checkpoint(whole / "last.pt")
    assert resumed["epoch"] == 1 and resumed["step"] == 2 * one["step"] == full["step"]
    steps = [s["step"] for s in records(part, "step")]
    assert steps == sorted(steps) and steps[-1] == full["step"]
    for key in full["model"]:
        torch.testing.assert_close(resumed["model"][key], full["model"][key], msg=key)
    torch.testing.assert_close(resumed["policy"]["base_alpha"], full["policy"]["base_alpha"])


@pytest.mark.slow
def test_resume_with_more_epochs_follows_the_new_schedule(data, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--out", out, "--data", data, "--no-policy", *SMALL, "--epochs", "1",
               "--lr-scheduler", "steplr", "--lr-step-size", "1", "--lr-gamma", "0.5",
               "--lr-warmup-epochs", "0", "--lr", "0.1").exit_code == 0
    r = cli("train", "--no-policy", "--resume", out / "last.pt", "--epochs", "3")
    assert r.exit_code == 0, r.output
    lrs = [e["lr"] for e in records(out, "epoch")]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_finetune_and_eval_a_heated_checkpoint(data, tmp_path):
    heated, ft = tmp_path / "heated", tmp_path / "ft"
    assert cli("train", "--data", data, "--out", heated, "--grid", "8", "--impl", "reference",
               *SMALL).exit_code == 0
    r = cli("finetune", "--from", heated / "best.pt", "--out", ft, *SMALL, "--epochs", "1")
    assert r.exit_code == 0, r.output
    state = load_checkpoint(ft / "last.pt")
    assert state["stage"] == "finetune" and "policy" not in state
    assert records(ft, "step")[0]["lr"] < 0.01 * 1.0001  # warm-up starts at 1% of the lr
    out_json = tmp_path / "test.json"
    r = cli("eval", "--checkpoint", ft / "best.pt", "--json", out_json, "-j", "0")
    assert r.exit_code == 0, r.output
    metrics = json.loads(out_json.read_text())
    assert [k for k in metrics if k in METRIC_KEYS] == list(METRIC_KEYS)  # then the record's inputs
    assert metrics["n_images"] > 0 and 0 <= metrics["top1"] <= metrics["top5"] <= 1


@pytest.mark.slow
def test_finetune_on_other_classes_keeps_the_trunk_and_starts_a_new_head(data, tmp_path):
    """The paper's transfer to unseen concepts: a downstream set with other classes."""
    import shutil
    heated = tmp_path / "heated"
    assert cli("train", "--data", data, "--out", heated, "--grid", "8", *SMALL,
               "--epochs", "1").exit_code == 0
    downstream = make_synthetic(tmp_path / "down", images=240, seed=11, size=40, layout="folders")
    dropped = sorted(p.name for p in (downstream / "train").iterdir())[:3]
    for split in ("train", "val", "test"):
        for name in dropped:
            shutil.rmtree(downstream / split / name)
    ft = tmp_path / "ft"
    r = cli("finetune", "--from", heated / "last.pt", "--data", downstream, "--out", ft, *SMALL,
            "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "new classifier head, trunk loaded" in r.output
    before, after = load_checkpoint(heated / "last.pt"), load_checkpoint(ft / "last.pt")
    assert after["model"]["fc.weight"].shape[0] == before["model"]["fc.weight"].shape[0] - 3
    assert not set(dropped) & set(after["classes"])


def test_baseline_has_no_policy(data, tmp_path):
    out = tmp_path / "base"
    r = cli("train", "--no-policy", "--data", data, "--out", out, *SMALL, "--epochs", "1")
    assert r.exit_code == 0, r.output
    state = load_checkpoint(out / "last.pt")
    assert state["stage"] == "baseline" and "policy" not in state
    assert all(s["S"] == 0 for s in records(out, "step"))
    assert not any("mask_spread" in r or "policy_grad_norm" in r or "train_mask_spread" in r
                   for r in records(out, "step") + records(out, "epoch"))
    assert "  policy: " not in r.output


@pytest.mark.slow
def test_heated_validation_at_another_crop_size(data, tmp_path):
    """Validation masks are drawn at the eval crop, which may differ from the train crop."""
    out = tmp_path / "crops"
    r = cli("train", "--data", data, "--out", out, "--grid", "8", *SMALL, "--epochs", "1",
            "--val-resize-size", "44", "--val-crop-size", "40")
    assert r.exit_code == 0, r.output
    assert records(out, "epoch")[0]["val"]["n_images"] > 0


def test_amp_and_graphs_flags_on_the_cpu(data, tmp_path):
    out = tmp_path / "amp"
    r = cli("train", "--data", data, "--out", out, "--grid", "8", "--impl", "reference", "--amp",
            "--graphs", *SMALL, "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "--graphs: CUDA graphs need a GPU; running eagerly" in r.output
    steps = records(out, "step")
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert load_checkpoint(out / "last.pt")["config"]["amp"] is True


def test_nonfinite_policy_output_stops_with_the_step_named(data, tmp_path, monkeypatch):
    """NaN in a~ at the 3rd step: the masker's device flag is read with the metrics (every 4
    steps here) and the run stops with exit 3 and the step range, last.pt untouched."""
    from pgnm_fast.models.policy import PolicyNet
    real = PolicyNet.forward
    calls = {"n": 0}

    def poisoned(self, x):
        out = real(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out = out._replace(a_tilde=out.a_tilde.clone().fill_(float("nan")))
        return out

    monkeypatch.setattr(PolicyNet, "forward", poisoned)
    out = tmp_path / "nan"
    r = cli("train", "--data", data, "--out", out, "--grid", "8", "--impl", "reference", *SMALL)
    assert r.exit_code == 3, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(line) == 1 and "steps 1-4" in line[0] and "non-finite Beta parameters" in line[0]
    assert not (out / "last.pt").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data, tmp_path):
    """DistributedDataParallel over gloo: 2 processes, each a half of every epoch."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "pgnm_fast", "train", "--data", str(data), "--out", str(out),
                        "--grid", "8", "--impl", "reference", *SMALL, "--epochs", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    state = load_checkpoint(out / "last.pt")
    from pgnm_fast.pipelines.sources import open_source
    n_train = len(open_source(data).split("train"))
    assert state["step"] == (n_train + 1) // 2 // 16  # per-rank batches of one epoch
    assert "x 2" in p.stdout
    n_val = len(open_source(data).split("val"))  # sharded validation: every image once
    assert state["val_metrics"]["n_images"] == n_val == records(out, "epoch")[0]["val"]["n_images"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_average_and_validate_their_shards(data, tmp_path):
    """--average-last under torchrun: both processes average, each scores its val shard."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "ddp-avg"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "pgnm_fast", "train", "--no-policy", "--data", str(data), "--out",
                        str(out), *SMALL, "--average-last", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    from pgnm_fast.pipelines.sources import open_source
    n_val = len(open_source(data).split("val"))
    avg, last = load_checkpoint(out / "averaged.pt"), load_checkpoint(out / "last.pt")
    assert avg["averaged_epochs"] == [0, 1] and avg["val_metrics"]["n_images"] == n_val
    assert last["val_metrics"]["n_images"] == n_val
    # what the two shards reported is what one process measures on the saved checkpoints
    for name, saved in (("last.pt", last), ("averaged.pt", avg)):
        one = tmp_path / f"{name}.json"
        r = cli("eval", "--checkpoint", out / name, "--split", "val", "--json", one, "-j", "0")
        assert r.exit_code == 0, r.output
        alone = json.loads(one.read_text())
        for key, value in saved["val_metrics"].items():
            assert alone[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
