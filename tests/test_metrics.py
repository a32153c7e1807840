"""Evaluation metrics against scikit-learn's own functions and hand counts."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pgnm_fast.metrics import METRIC_KEYS, classification_metrics, json_safe, topk_accuracy


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
