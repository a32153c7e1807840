"""Check image files before an epoch starts: the bad-file rules of the packer and the loaders.

:func:`scan` reads every file once (threads) and sorts it into

- ``GREY8``: an 8-bit grey PNG whose chunk structure and CRCs are intact. DALI decodes these
  bit-exactly as PIL does.
- ``CONVERT``: a readable image that is not an 8-bit grey PNG: 16-bit or low-bit-depth grey,
  grey with transparency, RGB, RGBA, palette, or another format (JPEG, TIFF, ...). These go
  through :func:`pgnm_fast.pipelines.transforms.load_grey` (PIL), whose rules are the stated
  ones: 16-bit and other high-depth images are windowed per image by min-max to 0..255 (a
  constant image becomes 0); colour becomes grey by PIL's ITU-R 601-2 luma
  (``L = (299 R + 587 G + 114 B) / 1000``), alpha dropped first.
- bad: empty (0 bytes), not an image, a PNG that is truncated (no ``IEND``), has a chunk whose
  CRC does not match (a flipped byte), or no ``IDAT``; another format that PIL cannot decode.

A PNG is checked structurally by :mod:`.png` (chunk CRCs, the image data inflated to the size
its header implies); files of other formats are decoded with PIL. What happens to a bad file
(``--on-bad-image``) is decided in one place, :mod:`.badfiles`.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .png import (  # noqa: F401 (the kinds and Probe: the verdict's vocabulary)
    BAD,
    CONVERT,
    GREY8,
    PNG_SIGNATURE,
    Probe,
    header_probe,
    png_check,
)

COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def _pil_probe(path, nbytes: int) -> Probe:
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
            im.load()
    except Image.UnidentifiedImageError:
        return Probe(BAD, nbytes=nbytes, reason="not an image file")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        return Probe(BAD, nbytes=nbytes, reason=f"cannot decode image ({reason})")
    deep = mode.startswith("I") or mode == "F"
    return Probe(CONVERT, height, width, colour=mode in COLOUR_MODES, deep=deep, nbytes=nbytes)


def probe(path) -> Probe:
    """Read and check one file (module docstring)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Probe(BAD, reason=f"cannot read file ({e.strerror or e})")
    return probe_data(data, path)[0]


def probe_data(data: bytes, path) -> tuple[Probe, bytes | None]:
    """:func:`probe` of a file already read, with the inflated image data of a good PNG that is
    not interlaced (:func:`png_check`); ``path`` is read again only for other formats."""
    if not data:
        return Probe(BAD, reason="empty file (0 bytes)"), None
    if data.startswith(PNG_SIGNATURE):
        return png_check(memoryview(data), len(data))
    return _pil_probe(path, len(data)), None


def probe_header(path) -> tuple[Probe, int, int]:
    """(probe, size, modification time in ns) of one file from its PNG header and last chunk
    alone, for a PNG whose ``IHDR`` is valid and which ends in ``IEND``: its size, colour and
    depth, ``kind`` by colour type and depth only (a ``tRNS`` chunk is not looked for). The
    chunks' CRCs and the image data are not read: whoever decodes the file checks them
    (:func:`probe_data`). Any other file is checked in full here (:func:`probe`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return Probe(BAD, reason=f"cannot read file ({e.strerror or e})"), -1, -1
    size = mtime = -1
    try:
        st = os.fstat(fd)
        size, mtime = st.st_size, st.st_mtime_ns
        head = os.pread(fd, 33, 0)
        tail = os.pread(fd, 12, size - 12) if size >= 57 else b""
    except OSError:
        head = tail = b""
    finally:
        os.close(fd)
    found = header_probe(head, tail, size)
    return (found if found is not None else probe(path)), size, mtime


@dataclass
class ScanResult:
    """Per file: ``kind`` (GREY8, CONVERT, BAD), ``height``, ``width`` (0 for bad files),
    ``colour`` and ``deep`` flags; ``bad`` lists ``(index, reason)``."""
    files: list
    kind: np.ndarray
    height: np.ndarray
    width: np.ndarray
    colour: np.ndarray
    deep: np.ndarray
    nbytes: np.ndarray
    bad: list = field(default_factory=list)

    @property
    def good(self) -> np.ndarray:
        return np.flatnonzero(self.kind != BAD)


def default_threads() -> int:
    return min(16, 2 * len(os.sched_getaffinity(0)))


def scan(files, threads: int | None = None, chunk: int = 1024,
         processes: int = 0) -> ScanResult:
    """Probe every file in ``files`` with a thread pool (reads each file once), ``chunk`` files
    at a time: memory holds the per-file arrays and the probes of the chunks in flight, not a
    future per file. ``processes`` > 1: the chunks are spread over that many processes (each
    with its thread pool), for the CPU-bound part (chunk parsing, CRCs) on every core."""
    files = files if isinstance(files, list) else list(files)
    n = len(files)
    result = ScanResult(files, np.zeros(n, np.uint8), np.zeros(n, np.int32),
                        np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, bool),
                        np.zeros(n, np.int64))
    threads = threads or default_threads()
    if processes > 1 and n > chunk:
        with ProcessPoolExecutor(processes) as pool:
            pending = collections.deque()
            for start in range(0, n, chunk):
                pending.append((start, pool.submit(_scan_part, files[start:start + chunk],
                                                   max(1, threads // processes))))
                if len(pending) >= 2 * processes:
                    _place(result, *_result_of(pending.popleft()))
            while pending:
                _place(result, *_result_of(pending.popleft()))
        return result
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, n, chunk):
            _place(result, start, list(pool.map(probe, files[start:start + chunk])))
    return result


def scan_headers(files: list, threads: int | None = None, chunk: int = 256) \
        -> tuple[ScanResult, np.ndarray, np.ndarray]:
    """:func:`probe_header` of every file (threads, ``chunk`` files a task): the verdict from
    the headers, and each file's size and modification time (ns)."""
    n = len(files)
    result = ScanResult(files, np.zeros(n, np.uint8), np.zeros(n, np.int32),
                        np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, bool),
                        np.zeros(n, np.int64))
    size, mtime = np.full(n, -1, np.int64), np.full(n, -1, np.int64)

    def part(start):
        return start, [probe_header(f) for f in files[start:start + chunk]]
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        for start, found in pool.map(part, range(0, n, chunk)):
            _place(result, start, [p for p, _, _ in found])
            size[start:start + len(found)] = [s for _, s, _ in found]
            mtime[start:start + len(found)] = [t for _, _, t in found]
    return result, size, mtime


def _result_of(item):
    start, future = item
    return start, future.result()


def _scan_part(files: list, threads: int) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(probe, files))


def _place(result: ScanResult, start: int, probes: list) -> None:
    for i, p in enumerate(probes, start):
        result.kind[i], result.height[i], result.width[i] = p.kind, p.height, p.width
        result.colour[i], result.deep[i], result.nbytes[i] = p.colour, p.deep, p.nbytes
        if p.kind == BAD:
            result.bad.append((i, p.reason))
