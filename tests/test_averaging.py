"""--average-last N: averaged.pt holds the mean of the last N epochs' weights, survives a resume,
and is refused where it does not apply (CPU, a small synthetic set, seconds each)."""
import json

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast import run_state as ckpt_io
from pgnm_fast.cli import main
from pgnm_fast.metrics import METRIC_KEYS
from pgnm_fast.run_state import load_checkpoint
from pgnm_fast.synth import make_synthetic

SMALL = ["-b", "16", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size",
         "32", "-j", "0", "--print-freq", "4", "--seed", "5", "--lr", "0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=240, seed=12, size=40)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def epoch_states(monkeypatch):
    """The model state written to last.pt at the end of every epoch, in order."""
    seen, real = [], ckpt_io.save_run_state

    def spy(state, path):
        if str(path).endswith("last.pt"):
            seen.append({k: v.clone() for k, v in state.model.items()})
        return real(state, path)

    monkeypatch.setattr(ckpt_io, "save_run_state", spy)
    return seen


@pytest.mark.slow
def test_averaged_checkpoint_is_the_mean_of_the_last_epochs(data, tmp_path, epoch_states):
    out = tmp_path / "base"
    r = cli("train", "--no-policy", "--data", data, "--out", out, *SMALL, "--epochs", "3",
            "--average-last", "2")
    assert r.exit_code == 0, r.output
    assert len(epoch_states) == 3
    avg = load_checkpoint(out / "averaged.pt")
    assert avg["averaged_epochs"] == [1, 2] and avg["stage"] == "baseline"
    assert "optimizer" not in avg and set(avg["val_metrics"]) == set(METRIC_KEYS)
    moved = 0
    for key, value in avg["model"].items():
        one, two = epoch_states[1][key], epoch_states[2][key]
        if value.is_floating_point():
            torch.testing.assert_close(value, (one + two) / 2, rtol=1e-6, atol=1e-6, msg=key)
            moved += not torch.equal(one, two)
        else:  # BatchNorm's step counters: the last epoch's
            assert torch.equal(value, two), key
    assert moved > 10  # the weights did change between the epochs averaged
    assert "averaged the weights of epochs 1, 2" in r.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epochs"] for x in lines if x["kind"] == "averaged"] == [[1, 2]]
    # an ordinary checkpoint for eval
    r = cli("eval", "--checkpoint", out / "averaged.pt", "-j", "0")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_average_survives_an_interrupted_fine_tune(data, tmp_path, ctrl_c_in_epoch):
    heated = tmp_path / "heated"
    assert cli("train", "--data", data, "--out", heated, "--grid", "8", *SMALL,
               "--epochs", "1").exit_code == 0
    common = ["--from", heated / "last.pt", *SMALL, "--epochs", "3", "--average-last", "3"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli("finetune", "--out", whole, *common).exit_code == 0
    disarm = ctrl_c_in_epoch(2)
    assert cli("finetune", "--out", part, *common).exit_code != 0
    assert not (part / "averaged.pt").exists()
    assert load_checkpoint(part / "last.pt")["averaged"]["epochs"] == [0, 1]
    disarm()
    r = cli("finetune", "--from", heated / "last.pt", "--resume", part / "last.pt")
    assert r.exit_code == 0, r.output
    resumed, full = load_checkpoint(part / "averaged.pt"), load_checkpoint(whole / "averaged.pt")
    assert resumed["averaged_epochs"] == full["averaged_epochs"] == [0, 1, 2]
    for key in full["model"]:
        torch.testing.assert_close(resumed["model"][key], full["model"][key], msg=key)


@pytest.mark.parametrize("args, says", [
    (["--average-last", "2"], "--average-last applies to the fine-tune and baseline stages"),
    (["--no-policy", "--average-last", "3"], "--average-last must be between 0 and --epochs (2)"),
    (["--no-policy", "--average-last", "-1"], "--average-last must be between 0 and --epochs"),
])
def test_average_last_refused_where_it_does_not_apply(data, tmp_path, args, says):
    out = tmp_path / "run"
    r = cli("train", "--data", data, "--out", out, *SMALL, "--epochs", "2", *args)
    assert r.exit_code != 0 and f"Error: {says}" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()
