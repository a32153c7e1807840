"""pgnm-fast compare: the paired bootstrap, and the three stages end to end (CPU, tiny data)."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.metrics import BOOTSTRAP_KEYS, classification_metrics, paired_bootstrap
from pgnm_fast.synth import make_synthetic


def _logits(labels, accuracy, classes, rng):
    """Logits whose argmax is right on a random ``accuracy`` share of the images."""
    n = len(labels)
    logits = rng.normal(size=(n, classes))
    right = rng.random(n) < accuracy
    wrong = (labels + rng.integers(1, classes, n)) % classes
    logits[np.arange(n), np.where(right, labels, wrong)] += 10.0
    return logits


def test_bootstrap_difference_is_the_metric_difference_and_zero_for_one_model():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 500)
    a, b = _logits(labels, 0.5, 7, rng), _logits(labels, 0.6, 7, rng)
    result = paired_bootstrap(a, b, labels, resamples=200, seed=3)
    ma, mb = classification_metrics(a, labels)[0], classification_metrics(b, labels)[0]
    for key in BOOTSTRAP_KEYS:
        assert result[key]["difference"] == pytest.approx(mb[key] - ma[key], abs=1e-12)
        lo, hi = result[key]["ci95"]
        assert lo < result[key]["difference"] < hi
    same = paired_bootstrap(a, a, labels, resamples=50)
    for key in BOOTSTRAP_KEYS:
        assert same[key] == {"difference": 0.0, "ci95": [0.0, 0.0], "b_ahead": 0.0}


def test_bootstrap_sees_a_model_right_on_a_superset_of_images_as_ahead():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 400)
    a = _logits(labels, 0.6, 5, rng)
    b = a.copy()
    fix = np.flatnonzero(a.argmax(1) != labels)[:40]  # b also gets 40 of a's errors right
    b[fix, labels[fix]] += 100.0
    top1 = paired_bootstrap(a, b, labels, resamples=300)["top1"]
    assert top1["difference"] == pytest.approx(40 / 400)
    assert top1["ci95"][0] > 0 and top1["b_ahead"] == 1.0


def test_bootstrap_interval_covers_no_difference_when_there_is_none():
    """Two independent models of equal accuracy: the 95% interval of the top-1 difference holds
    0 in about 95% of 100 trials. The test wants at least 85; a correct interval falls below
    that with probability under 1e-4 (binomial, p = 0.93 allowing for the percentile method's
    slight under-coverage), while an interval a third too narrow covers about 80%."""
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(100):
        labels = rng.integers(0, 4, 300)
        a, b = _logits(labels, 0.7, 4, rng), _logits(labels, 0.7, 4, rng)
        lo, hi = paired_bootstrap(a, b, labels, resamples=300,
                                  seed=int(rng.integers(1 << 30)))["top1"]["ci95"]
        covered += lo <= 0 <= hi
    assert covered >= 85


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=240, seed=13, size=40)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


FAST = ["--epochs", "2", "--finetune-epochs", "1", "-b", "16", "-j", "0", "--grid", "8",
        "--resamples", "200"]


def test_compare_end_to_end_resumes_and_reuses(data, tmp_path, ctrl_c_in_epoch):
    out = tmp_path / "cmp"
    disarm = ctrl_c_in_epoch(1)  # stop in the heated stage's second epoch
    assert cli("compare", "--data", data, "--out", out, *FAST).exit_code != 0
    disarm()
    assert not (out / "compare.json").exists() and (out / "heated" / "last.pt").exists()
    r = cli("compare", "--data", data, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "heated stopped after epoch 0" in r.output and "resuming" in r.output
    report = json.loads((out / "compare.json").read_text())
    assert set(report["test"]) == {"baseline", "pgnm"} and set(report["difference"]) == set(
        BOOTSTRAP_KEYS)
    n_test = report["test"]["baseline"]["n_images"]
    assert n_test == report["test"]["pgnm"]["n_images"] > 0
    assert "baseline vs PGNM (heated + fine-tuned)" in r.output and "f1_macro" in r.output
    for stage in ("heated", "finetune", "baseline"):
        assert (out / stage / "best.pt").exists()
    again = cli("compare", "--data", data, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    assert again.output.count("already finished") == 3
    assert json.loads((out / "compare.json").read_text())["difference"] == report["difference"]


def test_compare_refuses_data_without_a_test_split_before_training(data, tmp_path):
    copy = shutil.copytree(data, tmp_path / "no-test")
    for csv in copy.glob("*test*.csv"):
        csv.unlink()
    out = tmp_path / "cmp"
    r = cli("compare", "--data", copy, "--out", out, *FAST)
    assert r.exit_code != 0 and "has no test split" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


def test_compare_under_torchrun_two_cpu_processes(data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "cmp"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "pgnm_fast", "compare", "--data", str(data), "--out", str(out),
                        *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("baseline vs PGNM") == 1  # rank 0 alone reports
    report = json.loads((out / "compare.json").read_text())
    assert "x 2" in p.stdout and report["test"]["pgnm"]["n_images"] > 0
