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
    from scipy.special import softmax  # lazily (with sklearn): the trainer imports this module
    from sklearn import metrics as skm
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


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of ``logits`` (N, C) against ``labels`` (N,): the validation loss
    that ``metrics.jsonl`` records beside the metrics (``val.loss``)."""
    from scipy.special import log_softmax
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return float(-logp[np.arange(len(logp)), np.asarray(labels, dtype=np.int64)].mean())


def per_class_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Precision, recall, F1 and support of every class (0 where undefined, e.g. a class never
    predicted), and the confusion matrix (rows: true class, columns: predicted), both over all
    ``logits.shape[1]`` classes."""
    from sklearn import metrics as skm  # lazily, as above
    classes = np.arange(np.asarray(logits).shape[1])
    pred = np.asarray(logits).argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, support = skm.precision_recall_fscore_support(labels, pred, labels=classes,
                                                               average=None, zero_division=0)
    table = {"precision": p, "recall": r, "f1": f, "support": support}
    return table, skm.confusion_matrix(labels, pred, labels=classes)


def _auc_ovo(logits: np.ndarray, labels: np.ndarray, present: np.ndarray) -> float:
    from scipy.special import softmax
    from sklearn import metrics as skm
    if len(present) < 2:
        return math.nan
    scores = softmax(logits[:, present], axis=1)  # renormalised over the present classes
    if len(present) == 2:
        return float(skm.roc_auc_score(labels == present[1], scores[:, 1]))
    return float(skm.roc_auc_score(labels, scores, multi_class="ovo", average="macro", labels=present))


TOP_K = 5


def reported_metrics(m: dict, classes: int) -> dict:
    """``m`` without top-5 when there are ``TOP_K`` classes or fewer (every image is then right
    in its top 5, and the number says nothing)."""
    return {k: v for k, v in m.items() if k != "top5" or classes > TOP_K}


def format_metrics(m: dict) -> str:
    """One line: ``top1 0.7312  top5 0.9804  ...  n 1200`` (the metrics ``m`` has)."""
    parts = [f"{k} {m[k]:.4f}" for k in METRIC_KEYS if k != "n_images" and k in m]
    return "  ".join(parts + [f"n_images {m['n_images']}"])


def json_safe(m: dict) -> dict:
    """NaN -> None, so the JSON file stays standard."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


BOOTSTRAP_KEYS = ("top1", "balanced_accuracy", "f1_macro")
# the metrics that follow from per-image counts, so a resample of the test images is a reweighting
WEIGHTED_KEYS = ("top1", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")


def _weighted_scores(pred: np.ndarray, labels: np.ndarray, present: np.ndarray,
                     weights: np.ndarray) -> np.ndarray:
    """:data:`WEIGHTED_KEYS` with each image counted ``weights`` times, by
    :func:`classification_metrics`' rules (macro over ``present``; 0 where undefined).
    ``weights`` (n,) gives shape (K,), ``weights`` (B, n) gives (B, K): one row per resample."""
    w = np.atleast_2d(weights).astype(np.float64)
    is_label = (labels[:, None] == present[None, :]).astype(np.float64)  # n x P
    hit = (pred == labels).astype(np.float64)
    support = w @ is_label
    tp = w @ (is_label * hit[:, None])
    predicted = w @ (pred[:, None] == present[None, :]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    top1 = (w @ hit) / w.sum(1)
    out = np.stack([top1, recall.mean(1), precision.mean(1), recall.mean(1), f1.mean(1)], axis=1)
    return out[0] if np.ndim(weights) == 1 else out


def _resample_weights(rng, n: int, resamples: int, chunk: int = 200):
    """Bootstrap resamples of ``n`` images as count weights, ``chunk`` rows at a time."""
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        idx = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def paired_bootstrap(logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray,
                     resamples: int = 1000, seed: int = 0) -> dict:
    """The difference b - a of :data:`BOOTSTRAP_KEYS` between two models scored on the same
    images, with a 95% percentile interval over ``resamples`` paired bootstrap resamples of the
    images (both models see the same resample) and the fraction of resamples in which b is
    ahead. Every resampled difference lies in [-1, 1], so the percentile interval does too.
    Returns ``{key: {"difference", "ci95": [lo, hi], "fraction_b_ahead"}}``."""
    labels = np.asarray(labels, dtype=np.int64)
    pred_a, pred_b = np.argmax(logits_a, 1), np.argmax(logits_b, 1)
    present, n = np.unique(labels), len(labels)
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([_weighted_scores(pred_b, labels, present, w)
                            - _weighted_scores(pred_a, labels, present, w)
                            for w in _resample_weights(rng, n, resamples)])
    ones = np.ones(n)
    full = (_weighted_scores(pred_b, labels, present, ones)
            - _weighted_scores(pred_a, labels, present, ones))
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    cols = [WEIGHTED_KEYS.index(k) for k in BOOTSTRAP_KEYS]
    return {key: {"difference": float(full[i]), "ci95": [float(lo[i]), float(hi[i])],
                  "fraction_b_ahead": float((diffs[:, i] > 0).mean())}
            for key, i in zip(BOOTSTRAP_KEYS, cols)}


SCORE_RANGE = (0.0, 1.0)  # every metric of METRIC_KEYS but n_images
DIFFERENCE_RANGE = (-1.0, 1.0)  # the difference of two such scores
MIN_FOR_INTERVAL = 3  # below this many seeds (or repeats) an interval over them is not informative


def bounded_interval(mean: float, se: float, df: float, bounds=SCORE_RANGE,
                     level: float = 0.95) -> list[float]:
    """A t-interval of a mean that can only lie in ``bounds``, formed on the logit scale of the
    range and mapped back, so it never leaves the range.

    With u = (mean - lo) / (hi - lo), the interval is logit(u) +- t_{df} * se_z, se_z = se /
    ((hi - lo) u (1 - u)) (the delta method), back through the logistic function. For a score in
    [0, 1] that is the logit scale; for a difference in [-1, 1] it is 2 atanh(d), Fisher's z
    scale. Near the middle of the range it equals mean +- t * se; near an end it bends away from
    it, as the sampling distribution of a mean near a bound does. Coverage on simulated scores
    near 0, 1 and in between: ``tests/test_metrics.py``. ``se`` 0 gives [mean, mean]."""
    from scipy import stats
    from scipy.special import expit, logit
    lo, hi = bounds
    mean = min(max(float(mean), lo), hi)
    if se <= 0:
        return [mean, mean]
    u = min(max((mean - lo) / (hi - lo), 1e-12), 1 - 1e-12)
    half = stats.t.ppf(0.5 + level / 2, min(df, 1e9)) * se / ((hi - lo) * u * (1 - u))
    return [float(lo + (hi - lo) * expit(logit(u) - half)),
            float(lo + (hi - lo) * expit(logit(u) + half))]


def t_interval(values, level: float = 0.95, bounds=SCORE_RANGE) -> list[float] | None:
    """Student-t interval of the mean of ``values``, which lie in ``bounds`` (scores by default;
    :data:`DIFFERENCE_RANGE` for differences), on the logit scale of the range
    (:func:`bounded_interval`), so it stays inside it. None for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    return bounded_interval(v.mean(), v.std(ddof=1) / np.sqrt(len(v)), len(v) - 1, bounds, level)


def seeds_and_images_interval(logits_a: list, logits_b: list, labels: np.ndarray,
                              resamples: int = 1000, seed: int = 0) -> dict:
    """The mean over seeds of the paired difference b - a of :data:`WEIGHTED_KEYS`, with a 95%
    interval that accounts for the seeds and for the test images.

    ``logits_a[s]``, ``logits_b[s]``: seed ``s``'s two models on the same test images ``labels``.
    Seeds and test images are crossed (every seed is scored on every image), so the variance of
    the mean difference has three parts: seed to seed (initialisation, data order, masks), the
    test images (shared by all seeds: their sampling error does not average out), and the
    interaction (which images a seed happens to get right). With d_s seed s's difference on the
    whole test split and N seeds, three moments are measured: v_seed = var(d_s) / N (seeds +
    interaction / N), v_img = the variance of mean(d) over bootstrap resamples of the test images,
    each resample the same for every seed and both models (images + interaction / N), and v_each =
    the mean over seeds of the bootstrap variance of d_s (images + interaction); so the
    interaction counted twice is v_int = (v_each - v_img) / (N - 1), and

        mean(d) +- t_{0.975, df} * sqrt(v_seed + v_img - v_int)

    formed on Fisher's z scale atanh(d) (:func:`bounded_interval`), so it stays in [-1, 1]
    (the sum floored at max(v_seed, v_img)), df Welch-Satterthwaite's for the one estimated from
    N seeds: (v_seed + v_img - v_int)^2 / (v_seed^2 / (N - 1)): the paired t-interval over seeds
    when the seeds dominate, the normal bootstrap interval when the images do. With one seed this
    is the percentile paired bootstrap of :func:`paired_bootstrap`. Coverage on simulated scores:
    ``tests/test_compare.py``. ``ci95_images``: the percentile interval over the image resamples
    alone, seeds fixed (for fewer than :data:`MIN_FOR_INTERVAL` seeds). Returns ``{key:
    {"difference", "ci95", "ci95_images", "seeds_ahead", "per_seed", "se_seeds", "se_images",
    "df"}}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    present, n, seeds = np.unique(labels), len(labels), len(logits_a)
    preds = [(np.argmax(a, 1), np.argmax(b, 1)) for a, b in zip(logits_a, logits_b)]

    def diffs(w):  # (seeds, B, K): b - a of every seed under weights w
        return np.stack([_weighted_scores(pb, labels, present, w)
                         - _weighted_scores(pa, labels, present, w) for pa, pb in preds])

    per_seed = diffs(np.ones((1, n)))[:, 0]
    boot = np.concatenate(list(map(diffs, _resample_weights(np.random.default_rng(seed), n,
                                                            resamples))), axis=1)
    mean = per_seed.mean(0)
    v_img = boot.mean(0).var(0, ddof=1)
    images_only = np.percentile(boot.mean(0), [2.5, 97.5], axis=0)  # (2, K)
    out = {}
    for i, key in enumerate(WEIGHTED_KEYS):
        if seeds == 1:
            lo, hi = np.percentile(boot[0, :, i], [2.5, 97.5])
            v_seed, se2, df = 0.0, v_img[i], math.inf
        else:
            v_seed = per_seed[:, i].var(ddof=1) / seeds
            v_int = (boot[:, :, i].var(1, ddof=1).mean() - v_img[i]) / (seeds - 1)
            se2 = max(v_seed + v_img[i] - v_int, v_seed, v_img[i])
            df = math.inf if v_seed == 0 else se2 ** 2 / (v_seed ** 2 / (seeds - 1))
            lo, hi = bounded_interval(mean[i], math.sqrt(se2), df, DIFFERENCE_RANGE)
        out[key] = {"difference": float(mean[i]), "ci95": [float(lo), float(hi)],
                    "ci95_images": [float(x) for x in images_only[:, i]],
                    "seeds_ahead": int((per_seed[:, i] > 0).sum()),
                    "per_seed": [float(x) for x in per_seed[:, i]],
                    "se_seeds": math.sqrt(v_seed), "se_images": float(math.sqrt(v_img[i])),
                    "df": None if math.isinf(df) else float(df)}
    return out
