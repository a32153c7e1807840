"""``pgnm-fast pack`` of a source whose images are arrays in memory (a MedMNIST file,
:mod:`.medmnist`): the same cache format (:mod:`.packed`), written without decoding.

Every split's images go into ``images.u8`` in record order (train, val, test), grey or RGB by
``channels`` (``auto``: as the file stores them; ``grey`` from RGB by PIL's ITU-R 601-2 luma,
:func:`~.transforms.grey_of`; ``rgb`` from grey: three equal channels). ``paths.txt`` names each
record ``FILE:SPLIT_images[i]``. Nothing is resumable: the whole pack is a few array writes,
each file atomic, the manifest last.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pgnm_fast.atomic import atomic_open
from pgnm_fast.errors import DataError

from .packed import DATA, FORMAT, PATHS, RECORD_DTYPE, RECORDS, VERSION, pixel_hash, renew_seal, sha256_file
from .split import SPLITS
from .transforms import grey_of


def _pixels(images: np.ndarray, nch: int) -> np.ndarray:
    """``(N, H, W, nch)`` uint8 from ``(N, H, W)`` or ``(N, H, W, 3)``."""
    a = images[..., None] if images.ndim == 3 else images
    if nch == a.shape[3]:
        return a
    if nch == 1:
        return np.stack([grey_of(x) for x in a])[..., None]
    return np.repeat(a, 3, axis=3)


def pack_arrays(source, out: Path, channels: str, log) -> dict:
    """Pack ``source`` (its splits: :class:`~.packed.PackedSplit` over arrays in memory) into
    ``out`` (module docstring); returns the manifest."""
    caches = {name: source.split(name) for name in SPLITS if name in source.splits}
    colour = all(s.cache.channels == 3 for s in caches.values())
    if channels == "auto":
        channels = "rgb" if colour else "grey"
    nch = {"grey": 1, "rgb": 3}.get(channels)
    if nch is None:
        raise DataError(f"--channels must be auto, grey or rgb, not {channels!r}")
    parts, rows, paths, offset = [], [], [], 0
    for code, name in enumerate(SPLITS):
        if name not in caches:
            continue
        split = caches[name]
        n = len(split)
        pixels = _pixels(split.cache.data.reshape((n, *split.cache.image(0).shape)), nch)
        rec = np.zeros(n, RECORD_DTYPE)
        h, w = pixels.shape[1:3]
        rec["offset"] = offset + np.arange(n, dtype=np.int64) * h * w * nch
        rec["height"], rec["width"], rec["channels"] = h, w, nch
        rec["split"], rec["label"] = code, split.labels
        rec["hash"] = [pixel_hash(np.ascontiguousarray(p)) for p in pixels]
        parts.append(pixels)
        rows.append(rec)
        paths += split.files
        offset += pixels.size
    with atomic_open(out / DATA, "wb") as f:
        for pixels in parts:
            f.write(np.ascontiguousarray(pixels).tobytes())
    records = np.concatenate(rows)
    with atomic_open(out / RECORDS, "wb") as f:
        np.save(f, records, allow_pickle=False)
    with atomic_open(out / PATHS, "w") as f:
        f.writelines(p + "\n" for p in paths)
    manifest = {
        "format": FORMAT, "version": VERSION, "classes": list(source.classes), "channels": nch,
        "records": int(len(records)),
        "splits": {name: len(s) for name, s in caches.items()},
        "data": {"file": DATA, "bytes": int(offset)},
        "records_file": {"file": RECORDS, "sha256": sha256_file(out / RECORDS)},
        "paths_file": {"file": PATHS, "sha256": sha256_file(out / PATHS)},
        "source": {"root": str(source.root), "layout": source.layout},
        "skipped": 0, "converted": {"deeper_than_8_bits": 0,
                                    "colour_to_grey": len(records) if colour and nch == 1 else 0},
        "rules": {"colour": "grey caches: colour images become grey by PIL's ITU-R 601-2 luma",
                  "hash": "blake2b, 8-byte digest, of each record's stored pixels "
                          "(little-endian uint64)"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    renew_seal(out, manifest)  # writes manifest.json, last
    sizes = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    log(f"packed {len(records)} images ({sizes}; {'grey' if nch == 1 else 'RGB'}, "
        f"{offset / 2 ** 30:.2f} GiB) into {out}")
    return json.loads((out / "manifest.json").read_text())
