"""The learning signals a run prints: one warning when the train CE blows up, whether the policy
moves (the device-side stats behind it), each data warning once."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast import console
from pgnm_fast.cli import main
from pgnm_fast.console import DivergenceWatch
from pgnm_fast.engine import N_STATS, _accumulate, mask_spread, policy_movement

SMALL = ["--epochs", "2", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "2", "--seed", "3", "--grid", "8"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def warnings_in(output):
    return [ln for ln in output.splitlines() if ln.startswith("warning: train CE ")]


def test_the_watch_warns_once_above_either_limit():
    lines = []
    watch = DivergenceWatch(6, lines.append, heated=True)
    write = watch.wrap(lambda record: lines.append(record["kind"]))
    write({"kind": "step", "ce": 1.9, "S": 5.7, "lr": 0.01})  # above ln(6), under 2.5x
    write({"kind": "epoch", "train_ce": 1.75, "train_S": 5.7, "lr": 0.01})
    write({"kind": "masks", "mask_mean": 0.5})
    assert lines == ["step", "epoch", "masks"]
    write({"kind": "step", "ce": 5.0, "S": 5.7, "lr": 0.1})  # 2.9x the first epoch, 2.8x ln(6)
    write({"kind": "step", "ce": 6.8, "S": 5.7, "lr": 0.1})
    write({"kind": "epoch", "train_ce": 6.5, "train_S": 5.7, "lr": 0.1})
    (warning,) = [ln for ln in lines if ln.startswith("warning")]
    assert warning == ("warning: train CE 5.00 is 2.9x first epoch (1.75), 2.8x ln(6): step "
                       "mean(S) x lr = 5.7 x 0.1 too large, lower --lr")
    assert lines.index(warning) == 3  # before the record that set it off is written


def test_the_first_epoch_limit_and_the_plain_stage_wording():
    watch = DivergenceWatch(100, None, heated=False)
    watch.first_epoch = 0.5  # far under ln(100): the rise limit alone
    assert watch.check(0.5 * console.CE_RISE, 0.0, 0.1) is None
    line = watch.check(0.5 * console.CE_RISE * 1.01, 0.0, 0.1)
    assert line.startswith("warning: train CE 1.52 is 3.0x first epoch (0.50), 0.3x ln(100)")
    assert line.endswith("step lr 0.1 too large, lower --lr")
    assert DivergenceWatch(2, None, heated=False).check(console.CE_CHANCE * math.log(2) * 1.01,
                                                        0.0, 0.1) is not None


def test_the_policy_stats_are_device_sums_read_once():
    a = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # E[m] = 0.5 and sigmoid(2) (b~ = 0)
    b = torch.zeros(2, 2)
    spread = mask_spread(a, b)
    assert spread.dim() == 0 and spread.item() == pytest.approx((torch.sigmoid(torch.tensor(2.0)) - 0.5).item() / 2)
    assert mask_spread(a[:1], b[:1]).item() == 0  # one image: no spread, not NaN
    stats = torch.zeros(N_STATS)
    logits, target, zero = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(())
    _accumulate(stats, zero, zero, zero, logits, target, torch.tensor(0.1), None)
    _accumulate(stats, zero, zero, zero, logits, target, torch.tensor(0.3), torch.tensor(2.0))
    moved = policy_movement(stats.tolist())
    assert moved == pytest.approx({"mask_spread": 0.2, "policy_grad_norm": 2.0})
    plain = torch.zeros(N_STATS)
    _accumulate(plain, zero, zero, zero, logits, target)
    assert plain[5:].tolist() == [0, 0, 0] and policy_movement(plain.tolist())["policy_grad_norm"] is None


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


def test_a_heated_run_that_blows_up_warns_exactly_once(data, tmp_path):
    r = cli("train", "--data", data, "--out", tmp_path / "hot", "--lr", "1", *SMALL)
    assert r.exit_code == 0, r.output
    records = [json.loads(ln) for ln in (tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()]
    ces = [rec["ce"] for rec in records if rec["kind"] == "step"]
    assert sum(ce > console.CE_CHANCE * math.log(13) for ce in ces) > 2  # many windows, one line
    (warning,) = warnings_in(r.output)
    assert "mean(S) x lr = " in warning and warning.endswith("lower --lr") and len(warning) <= 120


@pytest.mark.slow
def test_a_normal_run_has_no_warning(data, tmp_path):
    r = cli("train", "--data", data, "--out", tmp_path / "calm", "--lr", "0.01", *SMALL)
    assert r.exit_code == 0, r.output
    assert warnings_in(r.output) == [] and "warning" not in r.output


def test_masks_png_title_says_whether_the_expected_masks_are_flat():
    import numpy as np

    from pgnm_fast.plots import _flatness
    flat = np.full((3, 8, 8), 0.5, np.float32)
    assert _flatness(flat) == ("expected mask: mean 0.500, spread across images 0.0000, "
                               "range 0.500 to 0.500")
    moved = flat + np.array([-0.2, 0.0, 0.2], np.float32)[:, None, None]
    assert "spread across images 0.1633, range 0.300 to 0.700" in _flatness(moved)


def test_a_resumed_run_measures_against_its_first_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert DivergenceWatch.first_epoch_ce(path) is None  # a new run: no file yet
    path.write_text('{"kind": "step", "ce": 2.4}\n{"kind": "epoch", "train_ce": 1.5}\n'
                    '{"kind": "epoch", "train_ce": 1.2}\n{"kind": "epo')
    assert DivergenceWatch.first_epoch_ce(path) == 1.5
    lines = []
    watch = DivergenceWatch(1000, lines.append, heated=False, first_epoch=1.5)
    watch.see({"kind": "step", "ce": 4.4, "lr": 0.1})
    watch.see({"kind": "step", "ce": 4.6, "lr": 0.1})
    assert lines == ["warning: train CE 4.60 is 3.1x first epoch (1.50), 0.7x ln(1000): step lr 0.1 "
                     "too large, lower --lr"]


def test_a_non_finite_policy_gradient_is_named():
    from pgnm_fast.engine import TrainingDiverged, _read_window
    window = torch.tensor([8.0, 4.0, 8.0, 1.0, 4.0, 0.1, float("inf"), 1.0])
    with pytest.raises(TrainingDiverged, match="steps 3-4: the policy's gradient became non-finite"):
        _read_window(window, torch.tensor(False), 0, 2, 4, 1.0)
    window[6] = 2.0
    record = _read_window(window, torch.tensor(False), 0, 2, 4, 1.0)
    assert record["policy_grad_norm"] == 2.0 and record["mask_spread"] == pytest.approx(0.025)
    assert "mask_spread" not in _read_window(window, None, 0, 2, 4, 1.0)  # no policy: no keys
