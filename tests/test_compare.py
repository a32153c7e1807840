"""pgnm-fast compare: the paired bootstrap, and the three stages end to end (CPU, tiny data)."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.compare import make_plan
from pgnm_fast.metrics import (
    BOOTSTRAP_KEYS,
    DIFFERENCE_RANGE,
    METRIC_KEYS,
    classification_metrics,
    paired_bootstrap,
    seeds_and_images_interval,
    t_interval,
)
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
        assert same[key] == {"difference": 0.0, "ci95": [0.0, 0.0], "fraction_b_ahead": 0.0}


def test_bootstrap_sees_a_model_right_on_a_superset_of_images_as_ahead():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 400)
    a = _logits(labels, 0.6, 5, rng)
    b = a.copy()
    fix = np.flatnonzero(a.argmax(1) != labels)[:40]  # b also gets 40 of a's errors right
    b[fix, labels[fix]] += 100.0
    top1 = paired_bootstrap(a, b, labels, resamples=300)["top1"]
    assert top1["difference"] == pytest.approx(40 / 400)
    assert top1["ci95"][0] > 0 and top1["fraction_b_ahead"] == 1.0


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


FAST = ["--epochs", "1", "--finetune-epochs", "1", "-b", "16", "-j", "0", "--grid", "8",
        "--resamples", "200"]


@pytest.mark.slow
def test_compare_end_to_end_two_seeds_resumes_reuses_and_refuses_other_settings(
        data, tmp_path, monkeypatch):
    from pgnm_fast import stages
    out, real, calls = tmp_path / "cmp", stages.train_one_epoch, []

    def interrupted(*args, **kwargs):  # Ctrl-C as the 4th epoch starts: seed 1's heated stage
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "train_one_epoch", interrupted)
    assert cli("compare", "--data", data, "--out", out, "--seeds", "2", *FAST).exit_code != 0
    monkeypatch.setattr(stages, "train_one_epoch", real)
    assert not (out / "compare.json").exists() and (out / "seed-0" / "baseline" / "last.pt").exists()
    r = cli("compare", "--data", data, "--out", out, "--seeds", "2", *FAST)
    assert r.exit_code == 0, r.output
    assert r.output.count("already finished") == 3  # seed 0's stages reused, seed 1 trained
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1] and report["finetune_from"] == "last"
    assert report["epochs"] == {"pgnm": {"heated": 1, "finetune": 1, "total": 2},
                                "baseline": {"total": 1}}
    assert set(report["difference"]) == set(METRIC_KEYS[:-1])
    n_test = report["n_images"]
    for s in ("0", "1"):
        assert set(report["per_seed"][s]["bootstrap"]) == set(BOOTSTRAP_KEYS)
        assert report["per_seed"][s]["test"]["pgnm"]["n_images"] == n_test > 0
    for key in METRIC_KEYS[:-1]:
        d = report["difference"][key]
        per_seed = [report["per_seed"][s]["test"]["pgnm"][key]
                    - report["per_seed"][s]["test"]["baseline"][key] for s in ("0", "1")]
        assert d["per_seed"] == pytest.approx(per_seed, abs=1e-12)
        assert d["difference"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert d["seeds_ahead"] == sum(x > 0 for x in per_seed)
        lo, hi = d["ci95"]
        assert lo <= d["difference"] <= hi
    # the fine-tune started from the heated stage's last epoch, a different seed per seed
    ft = torch.load(out / "seed-1" / "finetune" / "last.pt", weights_only=False)
    assert ft["config"]["seed"] == 1
    assert "the heated stage's last epoch" in r.output and "epochs in all: PGNM 1 heated + 1" \
        in r.output and "reference, authors" in r.output and "0.5468" in r.output
    # 2 seeds: no interval over seeds, each seed's difference and the image interval instead
    assert "not informative" in r.output and "[95% CI, test images]" in r.output
    assert "wall time, seed 0: heated reused" in r.output and "wall time, seed 1: heated" in r.output
    assert "summed over the 2 seeds" in r.output
    assert report["classes"] == 13 and report["interval_over_seeds_informative"] is False
    assert (out / "compare.png").stat().st_size > 10_000
    for seed in (0, 1):
        for stage in ("heated", "finetune", "baseline"):
            assert (out / f"seed-{seed}" / stage / "best.pt").exists()
    again = cli("compare", "--data", data, "--out", out, "--seeds", "2", *FAST)
    assert again.exit_code == 0, again.output
    assert again.output.count("already finished") == 6
    assert json.loads((out / "compare.json").read_text())["difference"] == report["difference"]
    # another configuration refuses to resume, naming the setting
    other = FAST[:3] + ["3"] + FAST[4:]  # --finetune-epochs 3
    r = cli("compare", "--data", data, "--out", out, "--seeds", "2", *other)
    assert r.exit_code != 0 and "finetune.epochs = 1, not 3" in r.output, r.output
    assert "--finetune-epochs" in r.output and "Traceback" not in r.output
    r = cli("compare", "--data", data, "--out", out, "--finetune-from", "best", *FAST)
    assert r.exit_code != 0 and "finetune_from = 'last', not 'best'" in r.output, r.output
    r = cli("compare", "--data", data, "--out", out, "--match-budget", *FAST)
    assert r.exit_code != 0 and "--match-budget" in r.output, r.output


def test_match_budget_trains_the_baseline_as_long_as_heated_plus_finetune():
    plain = make_plan("tiny", {"epochs": 4, "grid": 8}, {"epochs": 3})
    matched = make_plan("tiny", {"epochs": 4, "grid": 8}, {"epochs": 3}, match_budget=True)
    assert plain["baseline"].epochs == 4 and matched["baseline"].epochs == 7
    assert matched["heated"].epochs == 4 and matched["finetune"].epochs == 3
    assert "grid" not in matched["overrides"]["baseline"]  # no policy settings in the baseline


def test_compare_refuses_data_without_a_test_split_before_training(data, tmp_path):
    copy = shutil.copytree(data, tmp_path / "no-test")
    for csv in copy.glob("*test*.csv"):
        csv.unlink()
    out = tmp_path / "cmp"
    r = cli("compare", "--data", copy, "--out", out, *FAST)
    assert r.exit_code != 0 and "has no test split" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.slow
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
    assert "x 2" in p.stdout and report["n_images"] > 0


def _simulated_arms(rng, seeds, images, shift, sd_seed, sd_image, sd_noise, classes=4):
    """Two arms' one-hot logits over ``seeds`` seeds on one test set drawn from a population.
    Image i is right for arm k in seed s when u_i + v_ik + e_iks + t_ks + shift_k > 0, with
    u_i ~ N(0, 1) the image's difficulty, v_ik ~ N(0, sd_image) how the arm fares on it in every
    seed, e_iks ~ N(0, sd_noise) per seed, t_ks ~ N(0, sd_seed) the seed's effect. The true top-1
    difference over images and seeds is Phi(shift_b / sd) - Phi(shift_a / sd), sd the total
    standard deviation; balanced accuracy has the same expectation (labels uniform)."""
    from scipy.stats import norm
    labels = rng.integers(0, classes, images)
    u = rng.normal(size=images)
    arms = []
    for c in shift:
        v = rng.normal(0, sd_image, images)
        arm = []
        for _ in range(seeds):
            right = u + v + rng.normal(0, sd_noise, images) + rng.normal(0, sd_seed) + c > 0
            pred = np.where(right, labels, (labels + rng.integers(1, classes, images)) % classes)
            arm.append(np.eye(classes)[pred])
        arms.append(arm)
    sd = np.sqrt(1 + sd_image ** 2 + sd_noise ** 2 + sd_seed ** 2)
    return arms[0], arms[1], labels, norm.cdf(shift[1] / sd) - norm.cdf(shift[0] / sd)


@pytest.mark.parametrize("regime, sd_seed, sd_image", [("seeds dominate", 0.1, 0.2),
                                                       ("test images dominate", 0.0, 0.8)])
def test_seed_interval_covers_the_true_difference_at_the_stated_rate(regime, sd_seed, sd_image):
    """3 seeds, 300 test images, 300 simulated experiments per regime (fixed seeds). The 95%
    interval of seeds_and_images_interval must cover the true top-1 and balanced-accuracy
    difference in 87-99% of them: measured 91.5% (seeds dominate; Welch-Satterthwaite df at N=3
    is slightly liberal) and 95% (images dominate) with 400 experiments; a correct 91.5% falls
    under 87% with probability about 0.3% (binomial), and an interval twice too wide (the
    t_{N-1} quantile on image-dominated variance) covers over 99%. The test has power: the same
    simulation makes the t-interval over seeds alone cover under 85% when the test images
    dominate, and the image bootstrap alone under 85% when the seeds do."""
    rng = np.random.default_rng(11)
    trials, covered, seeds_only, images_only = 300, np.zeros(2), 0, 0
    for _ in range(trials):
        a, b, labels, truth = _simulated_arms(rng, 3, 300, (0.3, 0.5), sd_seed, sd_image, 0.3)
        r = seeds_and_images_interval(a, b, labels, resamples=200,
                                      seed=int(rng.integers(1 << 30)))
        for j, key in enumerate(("top1", "balanced_accuracy")):
            lo, hi = r[key]["ci95"]
            covered[j] += lo <= truth <= hi
        lo, hi = t_interval(r["top1"]["per_seed"], bounds=DIFFERENCE_RANGE)
        seeds_only += lo <= truth <= hi
        images_only += abs(r["top1"]["difference"] - truth) <= 1.96 * r["top1"]["se_images"]
    assert all(0.87 <= c / trials <= 0.99 for c in covered), (regime, covered / trials)
    naive = images_only if sd_seed > 0 else seeds_only
    assert naive / trials < 0.85, (regime, naive / trials)


@pytest.mark.parametrize("shift", [(-2.0, 2.0), (2.0, -2.0)])
def test_seed_interval_near_the_ends_of_the_range_stays_in_it_and_covers(shift):
    """A difference near +1 (or -1): 3 seeds, 100 test images, 200 simulated experiments (fixed
    seeds). The mean +- t * se interval on the raw scale reaches past the end of [-1, 1] in some
    of them; the interval formed on Fisher's z scale never does, and still covers the true top-1
    and balanced-accuracy difference in 88-99% of them (measured 96%)."""
    rng = np.random.default_rng(12)
    trials, covered, raw_outside = 200, np.zeros(2), 0
    for _ in range(trials):
        a, b, labels, truth = _simulated_arms(rng, 3, 100, shift, 0.3, 0.2, 0.3)
        r = seeds_and_images_interval(a, b, labels, resamples=200,
                                      seed=int(rng.integers(1 << 30)))
        for j, key in enumerate(("top1", "balanced_accuracy")):
            lo, hi = r[key]["ci95"]
            assert -1 <= lo <= r[key]["difference"] <= hi <= 1, (key, lo, hi)
            lo_img, hi_img = r[key]["ci95_images"]
            assert -1 <= lo_img <= hi_img <= 1
            covered[j] += lo <= truth <= hi
        d = r["top1"]
        se = np.hypot(d["se_seeds"], d["se_images"])
        raw_outside += abs(d["difference"]) + 4.3 * se > 1  # t_{0.975, 2}: the smallest df
    assert abs(truth) > 0.85
    assert all(0.88 <= c / trials <= 0.99 for c in covered), covered / trials
    assert raw_outside > 0


def test_seed_interval_with_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(5)
    a, b, labels, _ = _simulated_arms(rng, 1, 200, (0.3, 0.5), 0.0, 0.3, 0.3)
    one = seeds_and_images_interval(a, b, labels, resamples=300, seed=9)
    boot = paired_bootstrap(a[0], b[0], labels, resamples=300, seed=9)
    for key in BOOTSTRAP_KEYS:
        assert one[key]["difference"] == pytest.approx(boot[key]["difference"])
        assert one[key]["ci95"] == pytest.approx(boot[key]["ci95"])
