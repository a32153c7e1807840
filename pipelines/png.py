"""The structural check of a PNG file in memory (the PNG part of :mod:`.check`).

:func:`png_check`: signature, chunk lengths, CRC-32 of every chunk, ``IHDR`` first, ``IEND``
last, and the compressed image data inflated: it must give exactly the bytes the header implies,
with valid row filter types, so a stream written broken under valid CRCs is found before an
epoch starts (inflating is cheaper than decoding: no unfiltering, no conversion).
:func:`header_probe`: what the 33-byte header and the last chunk alone tell.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

try:  # ISA-L's zlib: the same streams, checksums and errors; inflate about 2x, CRC-32 8x faster
    from isal import isal_zlib as ZLIB
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    ZLIB = zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY8, CONVERT, BAD = 0, 1, 2


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


IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}




def header_probe(head: bytes, tail: bytes, size: int) -> Probe | None:
    """The probe of a PNG from its first 33 bytes and last 12 alone, when its ``IHDR`` is valid
    and it ends in ``IEND`` (``kind`` by colour type and depth only); else None."""
    if tail == IEND_CHUNK and head[:16] == PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR":
        width, height, depth, ctype = struct.unpack(">IIBB", head[16:26])
        if width and height and depth in DEPTHS.get(ctype, ()) and head[28] in (0, 1):
            return Probe(GREY8 if ctype == 0 and depth == 8 else CONVERT, height, width,
                         colour=ctype in (2, 3, 6), deep=depth > 8, nbytes=size)
    return None
