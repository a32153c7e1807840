"""Evaluation metrics of docs/method.md §6, computed with scikit-learn over the classes present.

Inputs are logits (or log-probabilities): softmax scores are formed in float64 here, so a peaked
model's scores never underflow to an all-zero row. A test split that lacks some classes (small or
filtered data) is scored over the classes it has: macro averages and the one-vs-one ROC-AUC run
over the present classes only (the softmax over their logits, as a one-vs-one comparison needs),
and the absent ones are returned so the caller can name them in a warning. Predictions of absent
classes still count as errors.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import softmax
from sklearn import metrics as skm

from .errors import PgnmError

METRIC_KEYS = ("top1", "top5", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
               "roc_auc_ovo_macro", "n_images")


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


class NonFiniteOutputs(PgnmError):
    """Outputs that cannot be scored: the weights behind them diverged."""

    exit_code = 3


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           class_names: list[str] | None = None) -> tuple[dict, list[str]]:
    """``logits`` (N, C) classifier outputs, ``labels`` (N,) ints in [0, C).

    Returns ``(metrics, absent)``: the dict with exactly :data:`METRIC_KEYS` (floats; the AUC is
    NaN when fewer than two classes are present) and the names of classes absent from ``labels``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        raise NonFiniteOutputs(f"the classifier's outputs are NaN or infinite for {bad} of "
                               f"{len(logits)} images: its weights diverged (try a lower --lr, "
                               f"or an earlier checkpoint)")
    probs = softmax(logits, axis=1)
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    n_classes = probs.shape[1]
    names = class_names or [str(i) for i in range(n_classes)]
    present = np.unique(labels)
    absent = [names[i] for i in range(n_classes) if i not in set(present.tolist())]
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division in precision of never-predicted classes
        p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=present,
                                                         average="macro", zero_division=0)
    out = {
        "top1": float((pred == labels).mean()),
        "top5": topk_accuracy(probs, labels, 5),
        # balanced accuracy = macro recall over the classes present (sklearn's definition)
        "balanced_accuracy": float(r),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
        "roc_auc_ovo_macro": _auc_ovo(logits, labels, present),
        "n_images": int(len(labels)),
    }
    return out, absent


def _auc_ovo(logits: np.ndarray, labels: np.ndarray, present: np.ndarray) -> float:
    if len(present) < 2:
        return math.nan
    scores = softmax(logits[:, present], axis=1)  # renormalised over the present classes
    if len(present) == 2:
        return float(skm.roc_auc_score(labels == present[1], scores[:, 1]))
    return float(skm.roc_auc_score(labels, scores, multi_class="ovo", average="macro", labels=present))


def format_metrics(m: dict) -> str:
    """One line: ``top1 0.7312  top5 0.9804  ...  n 1200``."""
    parts = [f"{k} {m[k]:.4f}" for k in METRIC_KEYS if k != "n_images"]
    return "  ".join(parts + [f"n_images {m['n_images']}"])


def json_safe(m: dict) -> dict:
    """NaN -> None, so the JSON file stays standard."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


BOOTSTRAP_KEYS = ("top1", "balanced_accuracy", "f1_macro")


def _weighted_scores(pred: np.ndarray, labels: np.ndarray, present: np.ndarray,
                     weights: np.ndarray) -> np.ndarray:
    """top1, balanced accuracy and macro F1 with each image counted ``weights`` times, by
    :func:`classification_metrics`' rules (macro over ``present``; 0 where undefined)."""
    size = int(max(pred.max(), labels.max())) + 1
    hit = pred == labels
    support = np.bincount(labels, weights=weights, minlength=size)[present]
    tp = np.bincount(labels, weights=weights * hit, minlength=size)[present]
    predicted = np.bincount(pred, weights=weights, minlength=size)[present]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    return np.array([(weights * hit).sum() / weights.sum(), recall.mean(), f1.mean()])


def paired_bootstrap(logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray,
                     resamples: int = 1000, seed: int = 0) -> dict:
    """The difference b - a of :data:`BOOTSTRAP_KEYS` between two models scored on the same
    images, with a 95% percentile interval over ``resamples`` paired bootstrap resamples of the
    images (both models see the same resample) and the fraction of resamples in which b is
    ahead. Returns ``{key: {"difference", "ci95": [lo, hi], "b_ahead"}}``."""
    labels = np.asarray(labels, dtype=np.int64)
    pred_a, pred_b = np.argmax(logits_a, 1), np.argmax(logits_b, 1)
    present, n = np.unique(labels), len(labels)
    rng = np.random.default_rng(seed)
    diffs = np.empty((resamples, len(BOOTSTRAP_KEYS)))
    for r in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        diffs[r] = (_weighted_scores(pred_b, labels, present, weights)
                    - _weighted_scores(pred_a, labels, present, weights))
    ones = np.ones(n)
    full = (_weighted_scores(pred_b, labels, present, ones)
            - _weighted_scores(pred_a, labels, present, ones))
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    return {key: {"difference": float(full[i]), "ci95": [float(lo[i]), float(hi[i])],
                  "b_ahead": float((diffs[:, i] > 0).mean())}
            for i, key in enumerate(BOOTSTRAP_KEYS)}
