"""MedMNIST data: the ``.npz`` files the ``medmnist`` package writes (the ``medmnist`` layout of
:func:`~pgnm_fast.pipelines.sources.open_source`).

A file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``
and ``test_labels``: images uint8 ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB), at 28, 64, 128
or 224 px; labels int ``(N, 1)`` or ``(N,)``, one class per image. The file's own splits are
used. Class names come from a ``label`` or ``classes`` key holding one name per class where the
file has one, else they are ``class_0``, ``class_1``, ... (as many as the largest train label
needs).

``--data`` may name the file, or a folder holding exactly one ``.npz`` file (read when its keys
are MedMNIST's). A folder with several ``.npz`` files, such as several sizes of one task
(``pathmnist.npz``, ``pathmnist_64.npz``, ...), is refused with one line listing them: the run
must say which one it reads, so that it is reproducible.

The images are held in memory (an ``.npz`` is a zip archive: numpy cannot map it) and read
through the packed cache's interface (:class:`ArrayCache`), so every loader reads them as it
reads a cache: RGB images become grey by PIL's ITU-R 601-2 luma, as PNG files do, unless a run
with 3 input channels reads them with the plain PyTorch loader, which then keeps the colour
(the DALI and device loaders read them grey only). ``pgnm-fast pack`` writes them into a cache
(:mod:`.pack_arrays`) for runs that should not load the archive each time. A problem with the file stops with one
:class:`~pgnm_fast.errors.DataError` line naming the file and the key: a key missing, labels
neither ``(N,)`` nor ``(N, 1)`` (multi-label tasks such as ChestMNIST are not supported), no
images, labels negative, outside the class names or not integers, images not uint8 or of
another rank.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgnm_fast.errors import DataError

from .packed import RECORD_DTYPE, PackedSplit
from .split import SPLITS, DataSource

KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
NAME_KEYS = ("label", "classes")


class ArrayCache:
    """The :class:`~pgnm_fast.pipelines.packed.PackedCache` interface over one split's images in
    memory: ``data`` (the pixels, flat), ``records``, ``channels``, ``image(i)``.
    ``colour_input``: a 3-channel run through the plain loader keeps RGB pixels as they are."""

    colour_input = True

    def __init__(self, images: np.ndarray, labels: np.ndarray, names: list[str]):
        n, h, w = images.shape[:3]
        self.channels = 3 if images.ndim == 4 else 1
        self.data = np.ascontiguousarray(images).reshape(-1)
        self.classes, self.paths = names, None
        self.records = np.zeros(n, RECORD_DTYPE)
        self.records["offset"] = np.arange(n, dtype=np.int64) * (h * w * self.channels)
        self.records["height"], self.records["width"] = h, w
        self.records["channels"], self.records["label"] = self.channels, labels

    def image(self, i: int) -> np.ndarray:
        r = self.records[i]
        h, w, c = int(r["height"]), int(r["width"]), self.channels
        off = int(r["offset"])
        return self.data[off:off + h * w * c].reshape(h, w, c)


@dataclass
class MedMNISTSource(DataSource):
    arrays: dict = None
    names: list = None

    @property
    def classes(self) -> list[str]:
        return list(self.names)

    def split(self, name: str) -> PackedSplit:
        if name not in self.splits:
            raise DataError(f"{self.root}: no {name!r} split in this MedMNIST file")
        images, labels = self.arrays[name]
        files = [f"{self.root}:{name}_images[{i}]" for i in range(len(labels))]
        cache = ArrayCache(images, labels, self.classes)
        return PackedSplit(name, files, labels, self.classes, self.root.parent, cache=cache,
                           records=np.arange(len(labels)))


def _load(path: Path) -> dict:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            present = set(z.files)
            missing = [k for k in KEYS if k not in present]
            if missing:
                raise DataError(f"{path}: no key {missing[0]!r} (a MedMNIST file holds "
                                f"{', '.join(KEYS)})")
            arrays = {k: z[k] for k in KEYS}
            for key in NAME_KEYS:
                if key in present:
                    arrays["names"] = (key, z[key])
                    break
    except DataError:
        raise
    except ValueError as e:  # an object array (names pickled): allow_pickle=False refuses it
        raise DataError(f"{path}: a key holds Python objects, not arrays ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    return arrays


def _checked_split(path: Path, name: str, images: np.ndarray, labels: np.ndarray):
    key = f"{name}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} is {images.dtype}, expected uint8 images")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise DataError(f"{path}: {key} has shape {images.shape}, expected (N, H, W) grey or "
                        f"(N, H, W, 3) RGB")
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{path}: {key} holds no images (shape {images.shape})")
    key = f"{name}_labels"
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {key} has shape {labels.shape}: multi-label tasks (several "
                        f"labels per image) are not supported")
    if labels.ndim not in (1, 2) or len(labels) != len(images):
        raise DataError(f"{path}: {key} has shape {labels.shape}, expected ({len(images)},) "
                        f"or ({len(images)}, 1)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} is {labels.dtype}, expected integer class indices")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: {key} holds a negative label ({int(labels.min())})")
    return images, labels


def _class_names(path: Path, arrays: dict, train_labels: np.ndarray) -> list[str]:
    if "names" not in arrays:
        return [f"class_{i}" for i in range(int(train_labels.max()) + 1)]
    key, names = arrays["names"]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
        raise DataError(f"{path}: {key} should hold one class name per class (strings), not "
                        f"{names.dtype} of shape {names.shape}")
    names = [str(n.decode() if isinstance(n, bytes) else n) for n in names]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: {key} names a class twice")
    return names


def open_medmnist(path: Path) -> MedMNISTSource:
    """The MedMNIST file at ``path``, every split checked (module docstring)."""
    arrays = _load(path)
    splits = {s: _checked_split(path, s, arrays[f"{s}_images"], arrays[f"{s}_labels"])
              for s in SPLITS}
    names = _class_names(path, arrays, splits["train"][1])
    for s, (_, labels) in splits.items():
        if labels.max() >= len(names):
            raise DataError(f"{path}: {s}_labels holds label {int(labels.max())}, outside the "
                            f"{len(names)} classes" + (f" of {arrays['names'][0]}"
                                                       if "names" in arrays else
                                                       " the train labels name"))
    return MedMNISTSource(root=path, layout="medmnist", splits=list(SPLITS), arrays=splits,
                          names=names)


def detect_medmnist(path: Path, **_) -> MedMNISTSource | None:
    """The ``medmnist`` layout's detector: an ``.npz`` file, or a folder holding one."""
    if path.is_file():
        return open_medmnist(path) if path.suffix.lower() == ".npz" else None
    if not path.is_dir() or (path / "train").is_dir():
        return None
    found = sorted(p for p in path.glob("*.npz") if p.is_file() and not p.name.startswith("."))
    if not found:
        return None
    if len(found) > 1:
        listed = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise DataError(f"{path}: holds {len(found)} .npz files ({listed}): pass the one to "
                        f"read, e.g. --data {found[0]}")
    return open_medmnist(found[0])
