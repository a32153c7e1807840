"""The pack's decoding of one file: the loaders' rules (:func:`~.transforms.load_grey`) into
``height x width x channels`` uint8 pixels, an 8-bit grey PNG from the rows its check inflated."""
from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image

from . import check, png
from .transforms import to_grey


def decode(path, channels: int) -> np.ndarray:
    """``height x width x channels`` uint8 pixels of one file (module docstring rules)."""
    with Image.open(path) as im:
        im.load()
        if channels == 1:
            img = to_grey(im)
        elif im.mode in ("1", "L", "LA") or im.mode.startswith("I") or im.mode == "F":
            img = to_grey(im).convert("RGB")  # a grey image in an RGB set: 3 equal channels
        else:
            img = _to_rgb(im)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_checked(data: bytes, path, channels: int) -> tuple[check.Probe, memoryview | None]:
    """(the check's probe of a file read into ``data``, its pixels as bytes: ``None`` for a bad
    file). An 8-bit grey PNG's pixels come from the rows the check inflated (PIL unfilters them,
    from a stored, uncompressed zlib stream, into a buffer reused by the next call of this
    process: use them before); others are decoded by :func:`decode`."""
    found, raw = check.probe_data(data, path)
    if found.kind == check.BAD:
        return found, None
    if raw is not None and found.kind == check.GREY8 and channels == 1:
        pixels, im, core = _grey_frame(found.width, found.height)
        im.frombytes(_stored(raw), "zip", "L")  # PIL writes the rows into ``pixels``
        if im.im is not core:  # it copied the image before writing: take its pixels
            _FRAME.clear()
            return found, memoryview(im.tobytes())
        return found, memoryview(pixels)
    a = decode(io.BytesIO(data), channels)
    return found, memoryview(np.ascontiguousarray(a)).cast("B")  # no copy


_FRAME: dict = {}  # (width, height) -> (buffer, PIL image over it, its core): the last one


def _grey_frame(width: int, height: int):
    """A grey PIL image of this size whose pixels are a buffer of ours, made once for a run of
    images of one size (the caller uses its pixels before it decodes the next image)."""
    frame = _FRAME.get((width, height))
    if frame is None:
        pixels = bytearray(width * height)
        im = Image.frombuffer("L", (width, height), pixels, "raw", "L", 0, 1)
        _FRAME.clear()
        frame = _FRAME[(width, height)] = (pixels, im, im.im)
    return frame


def read_file(path) -> bytes:
    """The bytes of a file, read in one call where it can be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # one call for the whole file
        if len(data) != size:  # a short read, or it grew: read on to its end
            parts = [data]
            while part := os.read(fd, 1 << 20):
                parts.append(part)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def _stored(raw: bytes) -> bytes:
    """``raw`` as a zlib stream of stored (not compressed) blocks: PIL's PNG decoder unfilters
    its rows without inflating anything."""
    view, parts = memoryview(raw), [b"\x78\x01"]
    for start in range(0, len(raw), 65535):
        block = view[start:start + 65535]
        parts += [struct.pack("<BHH", start + 65535 >= len(raw), len(block),
                              len(block) ^ 0xFFFF), block]
    parts.append(struct.pack(">I", png.ZLIB.adler32(raw)))
    return b"".join(parts)
