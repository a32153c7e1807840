"""Evaluation metrics of SPEC section 6, computed with scikit-learn over the classes present.

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

METRIC_KEYS = ("top1", "top5", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
               "roc_auc_ovo_macro", "n_images")


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


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
