"""Edits a disk or a hand makes to a packed cache after it was packed (the tests of its seal)."""
import os
from pathlib import Path

import numpy as np


def flip_a_pixel(c: Path):
    rec = np.load(c / "records.npy")
    with open(c / "images.u8", "r+b") as f:
        f.seek(int(rec["offset"][3]) + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def zero_the_tail(c: Path):
    size = (c / "images.u8").stat().st_size
    with open(c / "images.u8", "r+b") as f:
        f.seek(size - 4096)
        f.write(b"\0" * 4096)


def change_a_label(c: Path):
    rec = np.load(c / "records.npy")
    rec["label"][0] = (rec["label"][0] + 1) % (rec["label"].max() + 1)
    np.save(c / "records.npy", rec)


EDITS = {"pixel": (flip_a_pixel, "images.u8"), "tail": (zero_the_tail, "images.u8"),
         "label": (change_a_label, "records.npy")}
