"""A small synthetic RadImageNet-like data set: the embedded default data of `pgnm-fast train`.

Three modalities with their own image statistics, a few anatomies and lesion labels, 13 classes:

- CT (abdomen: normal / nodule / cyst; chest: normal / nodule): sharp body outline, bright bone
  rim (ribs) and spine, near-uniform soft tissue, dark lungs, additive Gaussian noise.
- MR (brain: normal / nodule / cyst; knee: normal / cyst): smooth tissue contrast, a
  low-frequency multiplicative bias field, Rician noise (magnitude of complex Gaussian noise).
- US (normal / nodule / cyst): a fan-shaped sector on black, depth attenuation, multiplicative
  Rayleigh speckle; a cyst is anechoic with posterior acoustic enhancement.

"nodule" is a bright round lesion, "cyst" a dark one. Every image gets random position, size,
orientation and contrast jitter, and images of one synthetic patient share its body shape, so the
task is learnable but not trivial. Images are grouped into patients; the train/val/test split
(about 70/15/15) is by patient, per class, so every class is in every split.

Layouts (see docs/method.md §1):

- ``"radimagenet"``: ``out/radiology_ai/{CT,MR}/<anatomy>/<label>/*.png``,
  ``out/radiology_ai/US/<label>/*.png`` and ``out/RadiologyAI_{train,val,test}.csv`` with columns
  ``filename,label``. As in the distributed CSVs (as read by the public tools that use them),
  ``filename`` is the path relative to the folder that holds ``radiology_ai/``, starting with
  ``radiology_ai/``. The ``label`` column holds ``<anatomy>-<label>`` (``us-<label>`` for US), an
  imitation of the distributed label strings; readers derive the class from the path.
- ``"folders"``: ``out/{train,val,test}/<class>/*.png`` with class names such as
  ``CT__abdomen__normal`` (the "Refined RadImageNet" naming), the same images and splits.

File names are ``<modality>-<anatomy>-<label>-p<patient>-<index>.png`` (lower case), so the
patient of every image can be read back. Same seed, count and size give byte-identical files.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pgnm_fast.atomic import temporary_folder_beside, write_error
from pgnm_fast.errors import DataError
from pgnm_fast.folders import check_output_dir
from pgnm_fast.user_cache import cache_dir

GENERATOR_VERSION = 1
MIN_SIZE, MAX_SIZE = 8, 4096  # image side in pixels
INFO_FILE = "pgnm_fast_synth.json"
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  # train gets the rest, at least one patient each

# (modality, anatomy or None for US, label)
CLASS_PARTS = [
    ("CT", "abdomen", "normal"), ("CT", "abdomen", "nodule"), ("CT", "abdomen", "cyst"),
    ("CT", "chest", "normal"), ("CT", "chest", "nodule"),
    ("MR", "brain", "normal"), ("MR", "brain", "nodule"), ("MR", "brain", "cyst"),
    ("MR", "knee", "normal"), ("MR", "knee", "cyst"),
    ("US", None, "normal"), ("US", None, "nodule"), ("US", None, "cyst"),
]


def class_name(modality: str, anatomy: str | None, label: str) -> str:
    """The flat class-folder name, as the authors' conversion writes it: CT__abdomen__normal."""
    return "__".join(p for p in (modality, anatomy, label) if p)


CLASSES = sorted(class_name(*c) for c in CLASS_PARTS)

# Concepts absent from CLASS_PARTS, for few-shot transfer (`pgnm-fast transfer`): lesion kinds in
# anatomies where the default set never shows them, and a new lesion kind, "ring" (a bright rim
# around a dark core, as a rim-enhancing lesion), in one anatomy of each modality.
UNSEEN_PARTS = [
    ("CT", "chest", "cyst"), ("MR", "knee", "nodule"),
    ("CT", "abdomen", "ring"), ("MR", "brain", "ring"), ("US", None, "ring"),
]
CONCEPTS = {"default": CLASS_PARTS, "unseen": UNSEEN_PARTS}


# ----------------------------------------------------------------------------- image synthesis
def _sig(z):
    """Logistic function without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _u(rng, lo, hi, n):
    """n uniform draws shaped (n, 1, 1) to broadcast against (n, S, S) images."""
    return rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]


def _shape(n, x, y):
    return (n,) + np.broadcast_shapes(x.shape, y.shape)[1:]


def _lowfreq(rng, n, x, y, terms=4, fmax=3.0):
    """A smooth random field in about [-1, 1]: a sum of random plane waves of low frequency."""
    out = np.zeros(_shape(n, x, y), np.float32)
    for _ in range(terms):
        fx, fy = _u(rng, -fmax, fmax, n), _u(rng, -fmax, fmax, n)
        out += np.cos(fx * x + fy * y + _u(rng, 0, 2 * np.pi, n))
    return out / np.sqrt(terms / 2.0)


def _disc(u, v, cx, cy, radius, edge):
    """A soft disc mask of the given radius around (cx, cy); edge is the blur width."""
    return _sig((radius - np.sqrt((u - cx) ** 2 + (v - cy) ** 2)) / edge)


def _ellipse(u, v, cx, cy, rx, ry, edge):
    """A soft ellipse mask; edge is the blur width relative to the radii."""
    return _sig((1 - np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)) / edge)


def _lesion(img, label, u, v, lx, ly, rad, edge, bright, dark):
    """Paint a lesion: "nodule" bright, "cyst" dark, "ring" a bright rim around a dark core."""
    m = _disc(u, v, lx, ly, rad, edge)
    if label == "ring":
        core = _disc(u, v, lx, ly, 0.55 * rad, edge)
        return img + (m - core) * (max(bright, 0.8) - img) + core * (dark - img)
    return img + m * ((bright if label == "nodule" else dark) - img)


def _pose(rng, n, x, y, pscale):
    """Body coordinates (u, v): rotation, shift and scale jitter per image, size per patient."""
    th, cx, cy = _u(rng, -0.35, 0.35, n), _u(rng, -0.12, 0.12, n), _u(rng, -0.12, 0.12, n)
    s = pscale * _u(rng, 0.93, 1.07, n)
    c, sn = np.cos(th), np.sin(th)
    return (c * x + sn * y - cx) / s, (-sn * x + c * y - cy) / s


def _ct(rng, n, x, y, anatomy, label, pat, edge):
    u, v = _pose(rng, n, x, y, pat["scale"])
    a, b = 0.82 * pat["ax"], 0.62 * pat["ay"]
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    tissue = pat["level"]
    img = 0.03 + _sig((1 - r) / (edge / a)) * (tissue - 0.03)
    ang = np.arctan2(v, u)
    ribs = (np.cos((10 if anatomy == "chest" else 7) * ang + _u(rng, 0, 6.3, n)) > 0.1)
    ring = _sig((r - 0.88) / 0.01) * _sig((0.95 - r) / 0.01) * ribs
    img = img + ring * (0.9 - img)
    spine = _disc(u, v, 0.0, 0.5 * b, 0.1, edge)
    img = img + spine * (0.88 - img) - _disc(u, v, 0.0, 0.5 * b, 0.05, edge) * 0.25
    if anatomy == "abdomen":
        img += 0.07 * _ellipse(u, v, -0.35 * a, -0.1 * b, 0.35 * a, 0.42 * b, 0.05)  # liver
        for side in (-1, 1):
            img += 0.09 * _disc(u, v, side * 0.45 * a, 0.22 * b, 0.09, edge)
        lx, ly = _u(rng, -0.5, 0.5, n) * a, _u(rng, -0.45, 0.25, n) * b
        rad, bright, dark = _u(rng, 0.07, 0.13, n), 0.78, 0.18
    else:
        lungs = sum(_ellipse(u, v, s * 0.42 * a, -0.05 * b, 0.33 * a, 0.72 * b, 0.03)
                    for s in (-1, 1))
        img = img + lungs * (0.07 - img)
        heart = _ellipse(u, v, 0.1 * a, 0.15 * b, 0.25 * a, 0.3 * b, 0.06)
        img = img + heart * (tissue + 0.03 - img)
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
        lx = side * (0.42 + _u(rng, -0.12, 0.12, n)) * a
        ly = _u(rng, -0.45, 0.35, n) * b
        rad, bright, dark = _u(rng, 0.06, 0.11, n), 0.55, 0.0
    if label != "normal":
        img = _lesion(img, label, u, v, lx, ly, rad, 1.5 * edge, bright, dark)
    return img + rng.normal(0, 0.025, img.shape).astype(np.float32)


def _mr(rng, n, x, y, anatomy, label, pat, edge):
    u, v = _pose(rng, n, x, y, pat["scale"])
    w = 2.5 * edge  # MR edges are smoother than CT's
    if anatomy == "brain":
        r = np.sqrt((u / (0.72 * pat["ax"])) ** 2 + (v / (0.88 * pat["ay"])) ** 2)
        img = _sig((1 - r) / 0.02) * 0.72                      # scalp fat
        img = img + _sig((0.93 - r) / 0.015) * (0.08 - img)    # skull, dark
        brain = _sig((0.87 - r) / 0.015)
        white = _sig((0.6 - r) / 0.08)
        tissue = 0.44 + 0.14 * white + 0.05 * _lowfreq(rng, n, u, v, fmax=4.0)
        img = img + brain * (tissue - img)
        for s in (-1, 1):
            vent = _ellipse(u, v, s * 0.12, -0.05, 0.06, 0.2, 0.25)
            img = img + vent * (0.16 - img)
        lx, ly = _u(rng, -0.4, 0.4, n), _u(rng, -0.5, 0.5, n)
        rad = _u(rng, 0.08, 0.15, n)
    else:
        leg = _sig((0.55 * pat["ax"] - np.abs(u)) / w) * _sig((1.3 - np.abs(v)) / w)
        img = leg * (0.36 + 0.22 * _sig((np.abs(u) - 0.45 * pat["ax"]) / w))
        for cy, ry in ((-0.6, 0.53), (0.63, 0.53)):  # femur above, tibia below the joint gap
            qa, qb = (u / (0.3 * pat["ax"])) ** 2, ((v - cy) / ry) ** 2
            q = np.sqrt(np.sqrt(qa * qa + qb * qb))  # a superellipse, power 4
            img = img + _sig((1 - q) / 0.03) * (0.06 - img)   # dark cortex
            img = img + _sig((0.9 - q) / 0.03) * (0.7 - img)  # bright fatty marrow
        lx, ly = _u(rng, -0.35, 0.35, n), _u(rng, -0.2, 0.2, n)
        rad = _u(rng, 0.08, 0.14, n)
    if label != "normal":
        img = _lesion(img, label, u, v, lx, ly, rad, w, 0.88, 0.1)
    bias = np.exp(0.25 * (_u(rng, -1, 1, n) * x + _u(rng, -1, 1, n) * y)
                  + 0.12 * _lowfreq(rng, n, x, y, terms=2, fmax=1.5))
    sigma = _u(rng, 0.02, 0.04, n)
    n1 = rng.normal(0, 1, img.shape).astype(np.float32)
    n2 = rng.normal(0, 1, img.shape).astype(np.float32)
    return np.sqrt((img * bias + sigma * n1) ** 2 + (sigma * n2) ** 2)


def _us(rng, n, x, y, label, pat, edge):
    ax_, ay_ = x - _u(rng, -0.08, 0.08, n), y + 1.15 + _u(rng, -0.05, 0.05, n)  # apex above top
    rad, ang = np.sqrt(ax_ ** 2 + ay_ ** 2), np.arctan2(ax_, ay_)
    half = pat["half"] * _u(rng, 0.95, 1.05, n)
    fan = (_sig((half - np.abs(ang)) / 0.01) * _sig((rad - 0.35) / 0.01)
           * _sig((2.3 - rad) / 0.01))
    layers = 0.08 * np.sin(rad * _u(rng, 6, 10, n) + _u(rng, 0, 6.3, n))
    echo = pat["level"] + layers + 0.1 * _lowfreq(rng, n, x, y, fmax=3.0)
    boundary = _sig((0.04 - np.abs(rad - _u(rng, 1.3, 1.9, n) - 0.1 * np.sin(3 * ang))) / 0.01)
    echo = echo + 0.35 * boundary
    if label != "normal":
        lr, la = _u(rng, 0.9, 1.5, n), _u(rng, -0.6, 0.6, n) * half
        lx, ly = lr * np.sin(la), lr * np.cos(la)
        size = _u(rng, 0.09, 0.16, n)
        m = _disc(ax_, ay_, lx, ly, size, 1.5 * edge)
        if label == "nodule":
            echo = echo * (1 + 0.9 * m)
        elif label == "ring":  # echogenic rim, anechoic core
            core = _disc(ax_, ay_, lx, ly, 0.55 * size, 1.5 * edge)
            echo = echo * (1 + 1.2 * (m - core)) * (1 - 0.9 * core)
        else:  # anechoic cyst, brighter tissue behind it (posterior acoustic enhancement)
            behind = _sig((rad - lr) / 0.02) * _sig((size - np.abs((ang - la) * rad)) / 0.02)
            echo = echo * (1 + 0.35 * behind * (1 - m)) * (1 - 0.9 * m)
    speckle = rng.rayleigh(1.0, _shape(n, x, y)).astype(np.float32)
    speckle = 0.5 * (speckle + np.roll(speckle, 1, axis=2)) / np.sqrt(np.pi / 2)
    return fan * echo * np.exp(-0.3 * (rad - 0.35)) * speckle


def _patients(rng, n, modality):
    """Per-patient shape and intensity parameters, shape (n, 1, 1) each."""
    p = {"scale": _u(rng, 0.88, 1.05, n), "ax": _u(rng, 0.9, 1.1, n),
         "ay": _u(rng, 0.9, 1.1, n)}
    p["level"] = _u(rng, 0.4, 0.5, n) if modality != "US" else _u(rng, 0.35, 0.5, n)
    p["half"] = _u(rng, 0.55, 0.7, n)
    return p


def _render(rng, spec, patient_of, size):
    """uint8 images (n, size, size) for one class; patient_of[i] is image i's patient (0..P-1)."""
    modality, anatomy, label = spec
    n = len(patient_of)
    lin = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    x, y = lin[None, None, :], lin[None, :, None]
    pats = _patients(rng, int(patient_of.max()) + 1, modality)
    pat = {k: v[patient_of] for k, v in pats.items()}
    edge = 1.0 / size
    if modality == "CT":
        img = _ct(rng, n, x, y, anatomy, label, pat, edge)
    elif modality == "MR":
        img = _mr(rng, n, x, y, anatomy, label, pat, edge)
    else:
        img = _us(rng, n, x, y, label, pat, edge)
    gain, off = _u(rng, 0.85, 1.15, n), _u(rng, -0.05, 0.05, n)
    img = np.clip(gain * (img - 0.4) + 0.4 + off, 0.0, 1.0)
    return np.rint(img * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- data set
def _plan(images, seed, k=None):
    """Per class: image count, patient of each image, split of each patient, patient numbers
    (``k`` classes, default the default set's)."""
    k = len(CLASS_PARTS) if k is None else k
    if images < 3 * k:
        raise ValueError(f"make_synthetic needs at least {3 * k} images (3 per class), "
                         f"got {images}")
    counts = [images // k + (i < images % k) for i in range(k)]
    plans, npat = [], 0
    for ci, n in enumerate(counts):
        rng = np.random.default_rng([seed, ci, 1])
        p = max(3, int(round(n / 4)))
        patient_of = np.concatenate([np.arange(p), rng.integers(0, p, n - p)])
        patient_of.sort()
        order = rng.permutation(p)
        nval = max(1, int(round(SPLIT_FRACTIONS["val"] * p)))
        ntest = max(1, int(round(SPLIT_FRACTIONS["test"] * p)))
        split_of = np.array(["train"] * p, dtype=object)
        split_of[order[:nval]] = "val"
        split_of[order[nval:nval + ntest]] = "test"
        plans.append((patient_of, split_of, npat))
        npat += p
    ids = np.random.default_rng([seed, 0, 2]).permutation(npat) + 1  # global patient numbers
    return [(po, so, ids[off:off + int(po.max()) + 1]) for po, so, off in plans]


def check_options(images: int, seed: int, size: int) -> None:
    """One line naming the flag (``--images``, ``--seed``, ``--size``) that is out of range."""
    from pgnm_fast.errors import ConfigError
    if images < 3 * len(CLASS_PARTS):
        raise ConfigError(f"--images must be at least {3 * len(CLASS_PARTS)} (3 per class, "
                          f"{len(CLASS_PARTS)} classes), not {images}")
    if not 0 <= seed < 2 ** 32:
        raise ConfigError(f"--seed must be in [0, 2**32), not {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}")


def make_synthetic(out, images: int = 2400, seed: int = 0, size: int = 96,
                   layout: str = "radimagenet", concepts: str = "default") -> Path:
    """Write the synthetic data set under ``out`` (created; must be absent or empty); return it.

    ``layout="radimagenet"`` writes ``radiology_ai/...`` and ``RadiologyAI_{train,val,test}.csv``,
    ``layout="folders"`` writes ``{train,val,test}/<class>/*.png`` (module docstring). The same
    (images, seed, size) give byte-identical files in either layout. ``concepts="unseen"``
    draws the classes of :data:`UNSEEN_PARTS` instead of :data:`CLASS_PARTS` (none in common).
    """
    if concepts not in CONCEPTS:
        raise ValueError(f"concepts must be one of {', '.join(CONCEPTS)}, got {concepts!r}")
    if layout not in ("radimagenet", "folders"):
        raise ValueError(f"layout must be 'radimagenet' or 'folders', got {layout!r}")
    check_options(images, seed, size)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: synthetic data needs an empty or absent folder")
    check_output_dir(out, "--out")
    with temporary_folder_beside(out) as tmp:  # a killed generation leaves no half data set
        try:
            _write(tmp, images, seed, size, layout, concepts)
            os.rename(tmp, out)  # onto an absent or empty folder
        except OSError as e:
            raise write_error(out, e) from None
    return out


def _write(out: Path, images: int, seed: int, size: int, layout: str, concepts: str) -> None:
    specs = CONCEPTS[concepts]
    rows = {"train": [], "val": [], "test": []}
    made = set()
    plans = _plan(images, seed, len(specs))
    for ci, (spec, (patient_of, split_of, pids)) in enumerate(zip(specs, plans)):
        modality, anatomy, label = spec
        pixels = _render(np.random.default_rng([seed, ci, 3]), spec, patient_of, size)
        stem = "-".join(p for p in (modality.lower(), anatomy, label) if p)
        cname = class_name(*spec)
        if layout == "radimagenet":
            rel_dir = "/".join(p for p in ("radiology_ai", modality, anatomy, label) if p)
        seen = {}
        for img, pat in zip(pixels, patient_of):
            seen[pat] = seen.get(pat, 0) + 1
            fname = f"{stem}-p{pids[pat]:05d}-{seen[pat]:02d}.png"
            split = split_of[pat]
            if layout == "radimagenet":
                rel = f"{rel_dir}/{fname}"
                rows[split].append((rel, f"{anatomy or 'us'}-{label}"))
            else:
                rel = f"{split}/{cname}/{fname}"
            path = out / rel
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            Image.fromarray(img).save(path, format="PNG")
    if layout == "radimagenet":
        for split, split_rows in rows.items():
            with open(out / f"RadiologyAI_{split}.csv", "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["filename", "label"])
                w.writerows(sorted(split_rows))
    info = {"generator_version": GENERATOR_VERSION, "images": images, "seed": seed,
            "size": size, "layout": layout, "concepts": concepts,
            "classes": sorted(class_name(*c) for c in specs)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def default_data_root(images: int = 2400, seed: int = 0, size: int = 96) -> Path:
    """Where the default synthetic set lives: named by generator version, seed, count and size."""
    return cache_dir() / f"synth-v{GENERATOR_VERSION}-seed{seed}-n{images}-{size}px"


def ensure_default_data(log=print, images: int = 2400, seed: int = 0, size: int = 96) -> Path:
    """Return the default synthetic data root, generating it first if it is absent.

    Generation writes into a temporary sibling folder that is renamed into place only when
    complete, so an interrupted run never leaves a half data set that a later run would reuse.
    Says in one line via ``log`` whether the set was generated or reused.
    """
    root = default_data_root(images, seed, size)
    if (root / INFO_FILE).is_file():
        log(f"Reusing the synthetic data set at {root}")
        return root
    if root.exists():
        raise DataError(f"{root}: exists but holds no complete synthetic data set ({INFO_FILE} "
                        f"missing); delete it to regenerate")
    with temporary_folder_beside(root) as tmp:
        make_synthetic(tmp / "data", images=images, seed=seed, size=size)
        try:
            os.rename(tmp / "data", root)
        except OSError as e:
            if not (root / INFO_FILE).is_file():  # not a concurrent run that finished first
                raise write_error(root, e) from None
    log(f"Generated a synthetic data set of {images} images ({size}x{size}, "
        f"{len(CLASSES)} classes, seed {seed}) at {root}")
    return root
