"""The packed cache's format and its reader: ``open_packed(path)`` (the ``packed`` layout of
:func:`~pgnm_fast.pipelines.sources.open_source`) and ``verify(path)``. ``pgnm-fast pack``
(:mod:`.pack`) writes it.

A cache folder holds

``images.u8``
    every record's pixels, row-major ``height x width x channels`` uint8, back to back (at the
    offsets of ``records.npy``; a file that failed to decode under ``--on-bad-image skip`` leaves
    an unused gap).
``records.npy``
    one row per image (numpy structured array, :data:`RECORD_DTYPE`): offset, height, width,
    channels, split (0 train, 1 val, 2 test), label (index into the manifest's classes), the
    content hash of the stored pixels (BLAKE2b, 8 bytes) and the source file's size in bytes.
``paths.txt``
    the source path of each record, one per line, in record order.
``manifest.json``
    format and version, class names, channels, split sizes, the data file's size, SHA-256 of
    ``records.npy`` and ``paths.txt``, the source it was packed from, the conversion rules and
    the seal (below). Written last: a folder is a cache exactly when it has a manifest.
``skipped.txt``
    with ``--on-bad-image skip``: ``path<TAB>reason`` of every file left out.

Trust: the manifest's ``seal`` holds the size and modification time (ns) of ``images.u8``,
``records.npy`` and ``paths.txt`` as ``pack`` wrote them, renewed by a ``pack --verify`` that
found every content hash right. Opening a cache (every loader, and ``pack --verify`` aside)
compares them with the files (one ``stat`` each) and hashes ``records.npy`` (48 bytes per
image) against the manifest's SHA-256; any difference stops with one line that says to run
``pack --verify``. A file written after the seal (a flipped pixel, a zeroed tail, a changed
label) thus stops a run at start, at no cost per pixel; an edit that also restores the file's
size and time is found by ``pack --verify`` alone, which reads every record. A copy that keeps
times (``cp -p``, ``rsync -t``) stays sealed; another copy needs one ``pack --verify``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pgnm_fast.errors import DataError

from . import check
from .split import SPLITS, DataSource, Split

FORMAT, VERSION = "pgnm-fast-pack", 1
MANIFEST, DATA, RECORDS, PATHS, SKIPPED, PARTIAL = (
    "manifest.json", "images.u8", "records.npy", "paths.txt", "skipped.txt", ".partial")
RECORD_DTYPE = np.dtype([("offset", "<i8"), ("height", "<i4"), ("width", "<i4"),
                         ("channels", "<u1"), ("split", "<u1"), ("label", "<i8"),
                         ("hash", "<u8"), ("source_bytes", "<i8")])


def pixel_hash(buf) -> int:
    return int.from_bytes(hashlib.blake2b(buf, digest_size=8).digest(), "little")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



# ----------------------------------------------------------------------------- the seal
SEALED = (DATA, RECORDS, PATHS)


def seal_of(root: Path) -> dict:
    """``{file: [size, modification time in ns]}`` of the cache's files, as they are now."""
    out = {}
    for name in SEALED:
        st = os.stat(root / name)
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def check_seal(root: Path, manifest: dict, records: bytes) -> None:
    """Trust a cache without reading its pixels (module docstring, "Trust"): every file's size
    and time as the seal records them, and the SHA-256 of ``records`` (the bytes of
    ``records.npy``). One DataError line that says to run ``pack --verify`` otherwise."""
    again = f"run pgnm-fast pack --verify {root}"
    seal = manifest.get("seal")
    if not isinstance(seal, dict):
        raise DataError(f"{root / MANIFEST}: no seal (packed by an earlier version); {again}")
    for name in SEALED:
        try:
            st = os.stat(root / name)
            now = [st.st_size, st.st_mtime_ns]
        except OSError:
            now = None
        if now != seal.get(name):
            raise DataError(f"{root / name}: {'missing' if now is None else 'changed'} since the "
                            f"cache was packed or last verified (size or time differs from the "
                            f"seal in {MANIFEST}); {again}")
    if hashlib.sha256(records).hexdigest() != manifest["records_file"]["sha256"]:
        raise DataError(f"{root / RECORDS}: content differs from the manifest's SHA-256; {again}")


def renew_seal(root: Path, manifest: dict) -> dict:
    """Record the files' sizes and times in the manifest (after ``pack`` or a passed
    ``--verify``), written atomically."""
    from pgnm_fast.atomic import atomic_open
    manifest = dict(manifest, seal=seal_of(root))
    with atomic_open(root / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


# ----------------------------------------------------------------------------- reading
class PackedCache:
    """A finished cache: manifest, records and a lazily opened read-only memory map (one per
    process, so DataLoader workers and forks each map the file themselves)."""

    def __init__(self, root, *, sealed: bool = True):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        self.classes = list(self.manifest["classes"])
        self.channels = int(self.manifest["channels"])
        try:
            raw = (self.root / RECORDS).read_bytes()
            self.records = np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.root / RECORDS}: unreadable ({e}); run pgnm-fast pack "
                            f"--verify {self.root}") from None
        self._paths, self._map = None, (None, None)
        size = (self.root / DATA).stat().st_size if (self.root / DATA).is_file() else -1
        if size != self.manifest["data"]["bytes"] or len(self.records) != self.manifest["records"]:
            raise DataError(f"{self.root / DATA}: {max(size, 0)} bytes and {len(self.records)} "
                            f"records, the manifest says {self.manifest['data']['bytes']} and "
                            f"{self.manifest['records']} (truncated?); run pgnm-fast pack "
                            f"--verify {self.root}")
        if sealed:
            check_seal(self.root, self.manifest, raw)

    @property
    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = (self.root / PATHS).read_text().splitlines()
            if len(self._paths) != len(self.records):
                raise DataError(f"{self.root / PATHS}: {len(self._paths)} lines for "
                                f"{len(self.records)} records; run pgnm-fast pack --verify")
        return self._paths

    @property
    def data(self) -> np.ndarray:
        pid, mm = self._map
        if pid != os.getpid():
            mm = np.memmap(self.root / DATA, dtype=np.uint8, mode="r")
            self._map = (os.getpid(), mm)
        return mm

    def image(self, i: int) -> np.ndarray:
        """Record ``i``'s pixels, ``height x width x channels`` (a view of the map)."""
        r = self.records[i]
        n = int(r["height"]) * int(r["width"]) * int(r["channels"])
        off = int(r["offset"])
        return self.data[off:off + n].reshape(int(r["height"]), int(r["width"]), int(r["channels"]))

    def __getstate__(self):  # DataLoader workers: never pickle the mapped pixels
        state = dict(self.__dict__)
        state["_map"] = (None, None)
        return state


def _read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{root / MANIFEST}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{root / MANIFEST}: not a pgnm-fast pack manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{root / MANIFEST}: pack format version {manifest.get('version')}, "
                        f"this version reads {VERSION}: pack the data again")
    return manifest


@dataclass(frozen=True)
class PackedSplit(Split):
    """A split of a packed cache: ``files`` and ``labels`` as in the source data set, and
    ``records[i]``, the cache record holding ``files[i]``'s pixels."""
    cache: PackedCache = None
    records: np.ndarray = None

    def grey(self, i: int):
        """Image ``i`` as an 8-bit grey PIL image, from the cache (RGB by PIL's luma)."""
        a = self.cache.image(self.records[i])
        img = Image.fromarray(a[:, :, 0]) if a.shape[2] == 1 else Image.fromarray(a)
        return img.convert("L")

    @property
    def heights(self) -> np.ndarray:
        return self.cache.records["height"][self.records].astype(np.int64)

    @property
    def widths(self) -> np.ndarray:
        return self.cache.records["width"][self.records].astype(np.int64)


@dataclass
class PackedSource(DataSource):
    cache: PackedCache = None

    @property
    def classes(self) -> list[str]:
        return list(self.cache.classes)

    def split(self, name: str) -> PackedSplit:
        if name not in self.splits:
            raise DataError(f"{self.root}: no {name!r} split in this packed cache (present: "
                            f"{', '.join(self.splits)})")
        idx = np.flatnonzero(self.cache.records["split"] == SPLITS.index(name))
        paths = self.cache.paths
        return PackedSplit(name, [paths[i] for i in idx],
                           self.cache.records["label"][idx].astype(np.int64), self.classes,
                           cache=self.cache, records=idx)


def open_packed(path) -> PackedSource:
    cache = PackedCache(path)
    splits = [s for s in SPLITS if cache.manifest["splits"].get(s)]
    return PackedSource(root=Path(path), layout="packed", splits=splits, cache=cache)


# ----------------------------------------------------------------------------- verification
def verify(path, *, threads: int | None = None, log=print) -> dict:
    """Check a cache against its manifest: the manifest, ``records.npy`` and ``paths.txt``
    (SHA-256), the data file's size, and every record's content hash. Raises a one-line
    DataError naming the file (and the record and its source) at the first problem."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        extra = " (an interrupted pack: run the pack command again)" \
            if (root / PARTIAL).is_dir() else ""
        raise DataError(f"{root}: no {MANIFEST}, not a finished cache{extra}")
    manifest = _read_manifest(root)
    for key in ("records_file", "paths_file"):
        f = root / manifest[key]["file"]
        if not f.is_file():
            raise DataError(f"{f}: missing")
        if sha256_file(f) != manifest[key]["sha256"]:
            raise DataError(f"{f}: content differs from the manifest's SHA-256 (modified or "
                            f"truncated)")
    data = root / manifest["data"]["file"]
    size = data.stat().st_size if data.is_file() else None
    if size != manifest["data"]["bytes"]:
        raise DataError(f"{data}: {'missing' if size is None else f'{size} bytes'}, the manifest "
                        f"says {manifest['data']['bytes']} (truncated or overwritten)")
    cache = PackedCache(root, sealed=False)
    rec, mm = cache.records, cache.data
    nbytes = rec["height"].astype(np.int64) * rec["width"] * rec["channels"]
    if len(rec) and (rec["offset"].min() < 0 or (rec["offset"] + nbytes).max() > size):
        raise DataError(f"{root / RECORDS}: record offsets outside {data}")

    def bad_in(lo_hi):
        lo, hi = lo_hi
        for i in range(lo, hi):
            off = int(rec["offset"][i])
            if pixel_hash(mm[off:off + int(nbytes[i])]) != int(rec["hash"][i]):
                return i
        return None

    blocks = [(lo, min(lo + 4096, len(rec))) for lo in range(0, len(rec), 4096)]
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads or check.default_threads()) as pool:
        for first in pool.map(bad_in, blocks):
            if first is not None:
                off = int(rec["offset"][first])
                raise DataError(f"{data}: record {first} (bytes {off}-{off + int(nbytes[first])}, "
                                f"from {cache.paths[first]}) does not match its content hash: "
                                f"the cache is corrupted, pack it again")
    try:
        manifest, sealed = renew_seal(root, manifest), "sealed"
    except OSError as e:  # a read-only cache: its seal stays as it was
        sealed = f"the seal in {MANIFEST} not renewed ({e.strerror or e})"
    log(f"{root}: {len(rec)} records, {size / 2 ** 30:.2f} GiB, all content hashes match "
        f"({time.perf_counter() - t0:.1f} s); {sealed}")
    return manifest
