"""Triton kernel for the device-resident loader's augmentation: PIL's bilinear resize of a crop
(two fixed-point passes through an 8-bit intermediate), then the normalisation table, written
into the output batch in its dtype and layout.

One program per (tile of BH x BW output pixels, image). The taps come from
:func:`pgnm_fast.pipelines.augment.resample_tables` (source rows / columns and 22-bit weights per
output row / column, a flip already folded into the columns); for each of the K row taps the
kernel forms the horizontal pass of that source row at the tile's columns (K gathers of uint8
pixels, int32 multiply-adds, PIL's round-half-up and clamp to 0..255) and adds it, weighted, to
the vertical sum, which is rounded and clamped the same way. Every step is integer arithmetic,
so the kernel equals :func:`pgnm_fast.pipelines.augment.resample_torch` bit for bit; the grey
level then indexes the 256-entry value table (already in the output dtype) and is stored to each
of the C output channels through the output's strides (NCHW or channels-last).
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 32
NUM_WARPS = 4


@triton.jit
def _resized_crop_kernel(data_ptr, base_ptr, stride_ptr, rows_ptr, roww_ptr, cols_ptr, colw_ptr,
                         table_ptr, out_ptr, S, sob, soc, soh, sow,
                         K: tl.constexpr, C: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    tw = tl.program_id(0)
    th = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ys = th * BH + tl.arange(0, BH)
    xs = tw * BW + tl.arange(0, BW)
    y_in = ys < S
    x_in = xs < S
    inside = y_in[:, None] & x_in[None, :]
    base = tl.load(base_ptr + b)
    stride = tl.load(stride_ptr + b)
    tab = b * S * K
    acc = tl.full([BH, BW], 2097152, tl.int32)  # 1 << 21: PIL's rounding
    for ky in tl.static_range(K):
        r = tl.load(rows_ptr + tab + ys * K + ky, mask=y_in, other=0).to(tl.int64)
        wy = tl.load(roww_ptr + tab + ys * K + ky, mask=y_in, other=0)
        row_off = base + r * stride
        h = tl.full([BH, BW], 2097152, tl.int32)
        for kx in tl.static_range(K):
            c = tl.load(cols_ptr + tab + xs * K + kx, mask=x_in, other=0).to(tl.int64)
            wx = tl.load(colw_ptr + tab + xs * K + kx, mask=x_in, other=0)
            p = tl.load(data_ptr + row_off[:, None] + c[None, :], mask=inside, other=0)
            h += wx[None, :] * p.to(tl.int32)
        h = tl.minimum(tl.maximum(h >> 22, 0), 255)
        acc += wy[:, None] * h
    grey = tl.minimum(tl.maximum(acc >> 22, 0), 255)
    value = tl.load(table_ptr + grey, mask=inside, other=0)
    offs = b * sob + ys[:, None].to(tl.int64) * soh + xs[None, :].to(tl.int64) * sow
    for ch in tl.static_range(C):
        tl.store(out_ptr + offs + ch * soc, value, mask=inside)


def resample_normalise(out, data, base, stride, rows, row_w, cols, col_w, table):
    """Launch the kernel: ``out`` ``[B, C, S, S]`` (any strides; ``table``'s dtype) gets the
    normalised crops whose taps are ``rows``/``row_w``/``cols``/``col_w`` ``[B, S, K]`` int32;
    ``data`` the flat uint8 images, ``base``/``stride`` ``[B]`` int64 (first pixel, row length).
    No host synchronisation: capturable in a CUDA graph."""
    batch, channels, size = out.shape[0], out.shape[1], out.shape[2]
    k = rows.shape[-1]
    launch = (triton.cdiv(size, BLOCK), triton.cdiv(size, BLOCK), batch)
    _resized_crop_kernel[launch](
        data, base, stride, rows.contiguous(), row_w.contiguous(), cols.contiguous(),
        col_w.contiguous(), table, out, size, *out.stride(),
        K=k, C=channels, BH=BLOCK, BW=BLOCK, num_warps=NUM_WARPS)
    return out
