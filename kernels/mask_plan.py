"""The fixed per-axis plan of the apply kernel: A = Blur @ Up and the band each output tile needs.

Nearest upsampling then a 13-tap blur make A (size x grid) banded: output pixel i depends on the
grid cells its 13 taps (reflected at the borders) land in, a few cells per axis. A tile of
``tile`` output pixels therefore needs only the columns [start, start + width) of A, with
``width`` a power of two >= 16 (``tl.dot``'s minimum) shared by every tile of that axis. The plan
is built once per (grid, crop) on the host and checked to cover every non-zero of A.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import BLUR_KERNEL_SIZE, BLUR_SIGMA, upsample_blur_matrix

TILE = 32  # output pixels per tile and axis in the apply kernel


@dataclass(frozen=True)
class AxisPlan:
    matrix: torch.Tensor  # (size, grid) float32, A = Blur @ Up
    starts: torch.Tensor  # (n_tiles,) int32, first grid column of each tile's band
    width: int            # band width, power of two >= 16
    tile: int             # output pixels per tile along this axis


def axis_plan(grid: int, size: int, tile: int = TILE, kernel_size: int = BLUR_KERNEL_SIZE,
              sigma: float = BLUR_SIGMA) -> AxisPlan:
    a = upsample_blur_matrix(grid, size, kernel_size, sigma, dtype=torch.float32)
    nonzero = a != 0
    n_tiles = -(-size // tile)
    first, last = [], []
    for t in range(n_tiles):
        cols = nonzero[t * tile:(t + 1) * tile].any(0).nonzero().flatten()
        first.append(int(cols.min()))
        last.append(int(cols.max()))
    span = max(hi - lo + 1 for lo, hi in zip(first, last))
    width = max(16, 1 << (span - 1).bit_length())
    starts = [min(lo, max(grid - width, 0)) for lo in first]
    for lo, hi, s in zip(first, last, starts):  # every non-zero of the tile lies in its band
        if not (s <= lo and hi < s + width):
            raise AssertionError(f"band plan misses columns {lo}..{hi} (band {s}..{s + width - 1})")
    return AxisPlan(a, torch.tensor(starts, dtype=torch.int32), width, tile)
