"""The training subsets of `pgnm-fast transfer` (:mod:`pgnm_fast.transfer`): which shot counts
the data can supply, the class-stratified subset of each (n, repeat), and its images, each
decoded once."""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError, DataError
from .pipelines.sources import Split


def parse_shots(text: str) -> list[int]:
    try:
        shots = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        shots = []
    if not shots or shots[0] < 1:
        raise ConfigError(f"--shots must be comma-separated positive integers, not {text!r}")
    return shots


def draw_subset(labels: np.ndarray, n: int, classes: int, seed: int, repeat: int) -> np.ndarray:
    """Indices into ``labels`` (the training pool) of a class-stratified subset of ``n`` images
    (module docstring), seeded by (seed, n, repeat). The caller checks that every class has
    ceil(n / classes) images."""
    rng = np.random.default_rng([seed, n, repeat])
    per_class = np.full(classes, n // classes)
    per_class[rng.choice(classes, n % classes, replace=False)] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in enumerate(per_class) if k]
    return np.sort(np.concatenate(picked))


def feasible_shots(shots, labels: np.ndarray, class_names: list[str], log) -> list[int]:
    """The shot counts every class can supply; a line per skipped one naming the short class."""
    counts = np.bincount(labels, minlength=len(class_names))
    keep = []
    for n in shots:
        need = math.ceil(n / len(class_names))
        if n < len(class_names):
            log(f"transfer: skipping n={n}: fewer images than the {len(class_names)} classes "
                f"(each class needs at least one)")
            continue
        short = int(np.argmin(counts))
        if counts[short] < need:
            log(f"transfer: skipping n={n}: it needs up to {need} training images per class "
                f"({n} over {len(class_names)} classes), and class {class_names[short]} has "
                f"{counts[short]}")
            continue
        keep.append(n)
    if not keep:
        raise DataError(f"no requested --shots value can be drawn: class "
                        f"{class_names[int(np.argmin(counts))]} has {int(counts.min())} training "
                        f"images; ask for at most {int(counts.min()) * len(class_names)} images")
    return keep


class Subsets:
    """The images and labels of each (n, repeat) subset of the pool (:func:`draw_subset`); an
    image is decoded once, when a run first needs it."""

    def __init__(self, train: Split, pool_at, pool_labels, shots, repeats: int, classes: int,
                 seed: int):
        self.train, self.pool_at, self.pool_labels = train, pool_at, pool_labels
        self.subsets = {(n, r): draw_subset(pool_labels, n, classes, seed, r)
                        for n in shots for r in range(repeats)}
        self.decoded: dict = {}  # pool index -> image

    def __call__(self, n: int, r: int):
        idx = self.subsets[(n, r)]
        self.decoded.update({i: self.train.grey(int(self.pool_at[i])) for i in idx
                             if i not in self.decoded})
        return [self.decoded[i] for i in idx], self.pool_labels[idx]
