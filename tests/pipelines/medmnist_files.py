"""Small MedMNIST-layout .npz files written with numpy (nothing downloaded)."""
from pathlib import Path

import numpy as np


def write_medmnist(path: Path, *, n=(40, 12, 12), size: int = 28, rgb: bool = False,
                   classes: int = 4, seed: int = 0, **override) -> Path:
    """A MedMNIST-layout ``.npz`` (``{train,val,test}_{images,labels}``: uint8 images
    ``(N, H, W)`` or ``(N, H, W, 3)``, int labels ``(N, 1)``); ``override`` replaces or (None)
    removes keys."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, count in zip(("train", "val", "test"), n):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        labels = np.arange(count) % classes
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        fill = (labels * 60).astype(np.uint8)
        images[:, : size // 2] = fill.reshape((-1,) + (1,) * (images.ndim - 1))
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels[:, None].astype(np.uint8)
    for key, value in override.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path
