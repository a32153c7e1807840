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

A PNG is checked structurally (signature, chunk lengths, CRC-32 of every chunk, ``IHDR`` first,
``IEND`` last) and its compressed image data is inflated: it must give exactly the bytes the
header implies, with valid row filter types, so a stream written broken under valid CRCs is
found here, not mid-epoch (inflating is cheaper than decoding: no unfiltering, no conversion).
Files of other formats are decoded with PIL.
"""
from __future__ import annotations

import collections
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pgnm_fast.errors import DataError

try:  # ISA-L's zlib: the same streams, checksums and errors; inflate about 2x, CRC-32 8x faster
    from isal import isal_zlib as ZLIB
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    ZLIB = zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY8, CONVERT, BAD = 0, 1, 2
COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


@dataclass(frozen=True)
class Probe:
    """What the scan learned about one file. ``reason`` is set only for bad files."""
    kind: int
    height: int = 0
    width: int = 0
    colour: bool = False     # stored as colour (RGB, RGBA, palette)
    deep: bool = False       # more than 8 bits per sample (windowed to 8 bits)
    nbytes: int = 0
    reason: str = ""


def _png_probe(data: memoryview, nbytes: int) -> Probe:
    return png_check(data, nbytes)[0]


def png_check(data: memoryview, nbytes: int) -> tuple[Probe, bytes | None]:
    """The probe of a PNG in memory and, for a good non-interlaced one, its inflated image data
    (filtered rows; ``None`` otherwise), so that a decoder need not inflate it again."""
    pos, ihdr, idat, iend, trns, idats = 8, None, False, False, False, []
    while pos + 8 <= len(data):
        length, = struct.unpack(">I", data[pos:pos + 4])
        ctype = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return Probe(BAD, nbytes=nbytes, reason=f"truncated PNG ({ctype.decode('latin-1')} "
                                                    f"chunk cut at byte {len(data)})"), None
        crc, = struct.unpack(">I", data[end - 4:end])
        if ZLIB.crc32(data[pos + 8:end - 4], ZLIB.crc32(ctype)) != crc:
            name = ctype.decode("latin-1")
            return Probe(BAD, nbytes=nbytes,
                         reason=f"corrupt PNG (CRC mismatch in the {name} chunk at byte {pos})"), None
        if ihdr is None:
            if ctype != b"IHDR" or length != 13:
                return Probe(BAD, nbytes=nbytes, reason="corrupt PNG (no IHDR chunk first)"), None
            ihdr = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif ctype == b"IDAT":
            idat = True
            idats.append(data[pos + 8:end - 4])
        elif ctype == b"tRNS":
            trns = True
        elif ctype == b"IEND":
            iend = True
            break
        pos = end
    if ihdr is None or not iend:
        return Probe(BAD, nbytes=nbytes, reason="truncated PNG (no IEND chunk)"), None
    width, height, depth, ctype_code = ihdr[:4]
    if not idat or width == 0 or height == 0:
        return Probe(BAD, nbytes=nbytes, reason="corrupt PNG (no image data)"), None
    broken, raw = _inflate(idats, width, height, depth, ctype_code, interlaced=ihdr[6] == 1)
    if broken:
        return Probe(BAD, nbytes=nbytes, reason=f"corrupt PNG ({broken})"), None
    native = ctype_code == 0 and depth == 8 and not trns  # transparency: PIL decides
    return Probe(GREY8 if native else CONVERT, height, width, colour=ctype_code in (2, 3, 6),
                 deep=depth > 8, nbytes=nbytes), raw if ihdr[6] == 0 else None


SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))  # (x0, y0, dx, dy) of the 7 interlace passes


def _inflate(idats, width, height, depth, ctype_code, interlaced) -> tuple[str, bytes]:
    """(why the compressed image data cannot decode, "" if it can; the inflated data): the zlib
    stream must inflate to exactly the size the header implies, and every row's filter byte must
    be 0-4. This proves what CRCs cannot (a stream written broken with valid checksums)."""
    if ctype_code not in SAMPLES or depth not in (1, 2, 4, 8, 16):
        return f"colour type {ctype_code} at bit depth {depth} is not valid PNG", b""
    bits = SAMPLES[ctype_code] * depth
    passes = [(width, height)] if not interlaced else [
        (-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in ADAM7]
    rows = [(w, h) for w, h in passes if w > 0 and h > 0]
    expected = sum(h * (1 + -(-w * bits // 8)) for w, h in rows)
    inflater = ZLIB.decompressobj()
    try:
        raw = inflater.decompress(idats[0] if len(idats) == 1 else b"".join(idats), expected + 1)
        if len(raw) == expected and inflater.unconsumed_tail:
            raw += inflater.decompress(inflater.unconsumed_tail, 1)  # more than expected?
    except ZLIB.error as e:
        return f"broken compressed image data: {e}", b""
    if len(raw) != expected:
        return (f"compressed image data inflates to {'more than ' if len(raw) > expected else ''}"
                f"{min(len(raw), expected)} bytes, the header implies {expected}"), b""
    if not interlaced:
        stride = 1 + -(-width * bits // 8)
        filters = np.frombuffer(raw, np.uint8)[::stride]
        if filters.max(initial=0) > 4:
            return f"row filter type {int(filters.max())} (valid: 0-4)", b""
    return "", raw


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


IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


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
    if tail == IEND_CHUNK and head[:16] == PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR":
        width, height, depth, ctype = struct.unpack(">IIBB", head[16:26])
        if width and height and depth in DEPTHS.get(ctype, ()) and head[28] in (0, 1):
            return (Probe(GREY8 if ctype == 0 and depth == 8 else CONVERT, height, width,
                          colour=ctype in (2, 3, 6), deep=depth > 8, nbytes=size), size, mtime)
    return probe(path), size, mtime


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


def check_on_bad(on_bad_image: str) -> str:
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"--on-bad-image must be error or skip, not {on_bad_image!r}")
    return on_bad_image


def report_bad(bad: list[tuple[str, str]], on_bad_image: str, list_path=None, log=print,
               what: str = "file") -> None:
    """Apply the ``--on-bad-image`` rule to ``bad`` = [(path, reason)]: ``error`` raises a
    one-line DataError naming the first file; ``skip`` writes ``path<TAB>reason`` lines to
    ``list_path`` (if given) and logs the count."""
    if not bad:
        return
    if check_on_bad(on_bad_image) == "error":
        more = f" (and {len(bad) - 1} more bad {what}s; --on-bad-image skip leaves them out)" \
            if len(bad) > 1 else " (--on-bad-image skip leaves it out)"
        raise DataError(f"{bad[0][0]}: {bad[0][1]}{more}")
    where = ""
    if list_path is not None:
        from pgnm_fast.atomic import atomic_open
        with atomic_open(list_path, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in bad)
        where = f", listed in {list_path}"
    log(f"skipped {len(bad)} bad {what}(s){where}; first: {bad[0][0]}: {bad[0][1]}")
