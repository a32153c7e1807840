"""Evaluation metrics against scikit-learn's own functions and hand counts."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pgnm_fast.metrics import (
    DIFFERENCE_RANGE,
    METRIC_KEYS,
    bounded_interval,
    classification_metrics,
    json_safe,
    t_interval,
    topk_accuracy,
)


def _random_scores(rng, n, c):
    logits = rng.normal(size=(n, c))
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def test_metrics_match_sklearn_when_all_classes_present():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.arange(7), rng.integers(0, 7, 293)])
    probs = _random_scores(rng, 300, 7)
    probs[np.arange(300), labels] += rng.uniform(0, 0.5, 300)  # better than chance
    probs /= probs.sum(1, keepdims=True)
    m, absent = classification_metrics(np.log(probs), labels)
    assert absent == [] and tuple(m) == METRIC_KEYS and m["n_images"] == 300
    pred = probs.argmax(1)
    assert m["top1"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=5))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(labels, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(labels, pred, average="macro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert m["roc_auc_ovo_macro"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovo"))


def test_absent_classes_are_named_and_metrics_use_present_ones():
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(6)]
    labels = rng.choice([0, 2, 3, 5], size=200)
    probs = _random_scores(rng, 200, 6)
    m, absent = classification_metrics(np.log(probs), labels, names)
    assert absent == ["c1", "c4"]
    present = np.array([0, 2, 3, 5])
    pred = probs.argmax(1)
    # Hand computation over the present classes: per-class recall, precision, F1, then the mean.
    rec = [np.mean(pred[labels == c] == c) for c in present]
    prec = [np.mean(labels[pred == c] == c) if (pred == c).any() else 0.0 for c in present]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(prec, rec)]
    assert m["recall_macro"] == pytest.approx(np.mean(rec))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(rec))
    assert m["precision_macro"] == pytest.approx(np.mean(prec))
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    sub = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    expect = skm.roc_auc_score(np.searchsorted(present, labels), sub, multi_class="ovo")
    assert m["roc_auc_ovo_macro"] == pytest.approx(expect)
    assert np.isfinite(m["roc_auc_ovo_macro"])


def test_one_class_present_gives_nan_auc_and_json_null():
    probs = _random_scores(np.random.default_rng(2), 10, 3)
    m, absent = classification_metrics(np.log(probs), np.full(10, 1))
    assert absent == ["0", "2"] and math.isnan(m["roc_auc_ovo_macro"])
    assert json_safe(m)["roc_auc_ovo_macro"] is None


def test_peaked_logits_never_underflow_the_auc():
    """A confident model whose mass sits on an absent class: float32 softmax scores of the
    present classes are all 0; the AUC over them still comes from their logits."""
    rng = np.random.default_rng(3)
    labels = rng.choice([1, 2, 3], size=60)
    logits = rng.normal(size=(60, 4)).astype(np.float32)
    logits[np.arange(60), labels] += 2.0
    logits[:, 0] += 200.0  # absent class 0 takes all the float32 softmax mass
    assert (softmax32(logits)[:, 1:] == 0).all()
    m, absent = classification_metrics(logits, labels, ["a", "b", "c", "d"])
    assert absent == ["a"]
    sub = logits[:, 1:].astype(np.float64)
    sub = np.exp(sub - sub.max(1, keepdims=True))
    expect = skm.roc_auc_score(labels - 1, sub / sub.sum(1, keepdims=True), multi_class="ovo")
    assert m["roc_auc_ovo_macro"] == pytest.approx(expect) and expect > 0.7


def softmax32(x):
    e = np.exp((x - x.max(1, keepdims=True)).astype(np.float32))
    return e / e.sum(1, keepdims=True)


def test_topk_with_fewer_classes_than_k():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 0, 1])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(2 / 3)
    assert topk_accuracy(probs, labels, 5) == 1.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        classification_metrics(np.ones((3, 2)) / 2, np.array([0, 1]))


@pytest.mark.parametrize("mean", [0.03, 0.5, 0.97])
@pytest.mark.parametrize("n", [3, 5])
def test_t_interval_of_scores_stays_in_0_1_and_covers_the_mean(mean, n):
    """Scores of n seeds drawn from a Beta distribution of the given mean (sd about 0.017 near the
    ends, 0.05 in the middle), 2000 simulated experiments (fixed seed). The interval must stay in
    [0, 1] every time and cover the true mean in 92-98% of them (measured 94.5-95.5%); near 0
    and 1 the plain mean +- t * se interval leaves [0, 1] in many of them (over 5%)."""
    rng = np.random.default_rng(21)
    from scipy import stats
    covered = outside = 0
    trials = 2000
    for _ in range(trials):
        v = rng.beta(mean * 100, (1 - mean) * 100, n)
        lo, hi = t_interval(v)
        assert 0 <= lo <= v.mean() <= hi <= 1
        covered += lo <= mean <= hi
        half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)
        outside += v.mean() - half < 0 or v.mean() + half > 1
    assert 0.92 <= covered / trials <= 0.98, covered / trials
    if mean != 0.5:
        assert outside / trials > 0.05, outside / trials


def test_t_interval_of_differences_stays_in_minus_1_1_and_matches_t_in_the_middle():
    from scipy import stats
    d = np.array([0.97, 0.99, 0.9])
    lo, hi = t_interval(d, bounds=DIFFERENCE_RANGE)
    assert -1 <= lo < d.mean() < hi <= 1
    plain = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert d.mean() + plain > 1  # the plain interval would leave the range
    small = np.array([0.001, -0.002, 0.0005, 0.0])
    half = stats.t.ppf(0.975, 3) * small.std(ddof=1) / 2
    assert t_interval(small, bounds=DIFFERENCE_RANGE) == pytest.approx(
        [small.mean() - half, small.mean() + half], abs=1e-7)
    assert t_interval([1.0, 1.0, 1.0]) == [1.0, 1.0] and t_interval([0.4]) is None
    assert bounded_interval(0.5, 0.0, 3) == [0.5, 0.5]


def test_top5_is_reported_only_with_more_than_5_classes():
    from pgnm_fast.metrics import format_metrics, reported_metrics
    probs = _random_scores(np.random.default_rng(4), 30, 3)
    m, _ = classification_metrics(np.log(probs), np.arange(30) % 3)
    three = reported_metrics(m, 3)
    assert "top5" not in three and "top5" not in format_metrics(three)
    assert "top1" in format_metrics(three)
    assert "top5" in format_metrics(reported_metrics(m, 6))
