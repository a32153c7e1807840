"""Triton kernel for the PGNM apply step (SPEC section 3): images * (A_h @ m @ A_w^T).

One program per (tile of BH x BW output pixels, group of IMAGES images): for each image it forms
its tile of the mask from the bands of A_h, A_w and m the tile needs (see :mod:`.mask_plan`; a few
KiB, cache-resident) with two float32-exact dots (``input_precision="ieee"``), then multiplies
every channel of the tile by it: each image element is read once and written once, the mask never
goes to memory. float32 math whatever the image
dtype (float32, bfloat16, float16), written back in the image's dtype.

Layouts (addressed by strides; the output may have its own): NCHW and any layout with unit
stride along W walk the channels one (BH, BW) tile at a time; channels-last with C > 1 loads one
(BH, BW, C) block (C padded to a power of two, masked), contiguous along its last axis, issued
before the mask tile is formed so its latency hides behind the two dots.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .special import cast_for_store


@triton.jit
def _mask_apply_kernel(x_ptr, y_ptr, m_ptr, ah_ptr, aw_ptr, hs_ptr, ws_ptr,
                       B, H, W, G,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       C: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       CP: tl.constexpr, IMAGES: tl.constexpr, BLOCK3D: tl.constexpr):
    tw = tl.program_id(0)
    th = tl.program_id(1)
    rows = th * BH + tl.arange(0, BH)
    cols = tw * BW + tl.arange(0, BW)
    kh = tl.load(hs_ptr + th) + tl.arange(0, KH)
    kw = tl.load(ws_ptr + tw) + tl.arange(0, KW)
    for i in range(IMAGES):
        img = tl.program_id(2).to(tl.int64) * IMAGES + i
        if img < B:
            if BLOCK3D:  # all channels as one (BH, BW, CP) block, loaded before the mask is formed
                ch = tl.arange(0, CP)
                inside = (rows < H)[:, None, None] & (cols < W)[None, :, None] & (ch < C)[None, None, :]
                x = tl.load(x_ptr + img * sxb + rows[:, None, None] * sxh + cols[None, :, None] * sxw
                            + ch[None, None, :] * sxc, mask=inside, other=0.0)
            # the mask tile: (A_h band) @ (m band) @ (A_w band)^T, zero outside the grid
            a_h = tl.load(ah_ptr + rows[:, None] * G + kh[None, :], mask=(rows < H)[:, None] & (kh < G)[None, :],
                          other=0.0)
            m = tl.load(m_ptr + img * G * G + kh[:, None] * G + kw[None, :],
                        mask=(kh < G)[:, None] & (kw < G)[None, :], other=0.0)
            a_wt = tl.load(aw_ptr + cols[None, :] * G + kw[:, None], mask=(kw < G)[:, None] & (cols < W)[None, :],
                           other=0.0)
            mask = tl.dot(tl.dot(a_h, m, input_precision="ieee"), a_wt, input_precision="ieee")
            if BLOCK3D:
                y = x.to(tl.float32) * mask[:, :, None]
                tl.store(y_ptr + img * syb + rows[:, None, None] * syh + cols[None, :, None] * syw
                         + ch[None, None, :] * syc, cast_for_store(y, y_ptr), mask=inside)
            else:  # one channel at a time (NCHW: unit stride along W)
                inside = (rows < H)[:, None] & (cols < W)[None, :]
                for c in range(C):
                    x = tl.load(x_ptr + img * sxb + c * sxc + rows[:, None] * sxh + cols[None, :] * sxw,
                                mask=inside, other=0.0)
                    y = x.to(tl.float32) * mask
                    tl.store(y_ptr + img * syb + c * syc + rows[:, None] * syh + cols[None, :] * syw,
                             cast_for_store(y, y_ptr), mask=inside)


# Launch settings for compiled runs (the interpreter ignores them), chosen without a GPU at hand
# from ptxas register counts on sm_90 (32 x 32 tiles (mask_plan.TILE), 8 warps: 86 registers, no
# spills, NCHW);
# bench/bench_kernels.py sweeps alternatives on a GPU and records which is fastest.
IMAGES_PER_PROGRAM = 2
NUM_WARPS = 8


def apply(images, out, m, plan_h, plan_w, starts_h, starts_w, a_h, a_w,
          images_per_program: int | None = None, num_warps: int | None = None):
    """Launch the apply kernel: ``out`` (same shape as ``images``) gets images * mask(m).

    ``plan_*`` give the tile and band sizes; ``starts_*``, ``a_*`` are their tensors on the
    images' device (the masker keeps them as buffers)."""
    batch, channels, height, width = images.shape
    grid = a_h.shape[1]
    per = images_per_program or IMAGES_PER_PROGRAM
    block3d = channels > 1 and images.stride(1) == 1  # channels-last: the channel axis is contiguous
    launch = (triton.cdiv(width, plan_w.tile), triton.cdiv(height, plan_h.tile), triton.cdiv(batch, per))
    _mask_apply_kernel[launch](
        images, out, m, a_h, a_w, starts_h, starts_w,
        batch, height, width, grid,
        *images.stride(), *out.stride(),
        C=channels, BH=plan_h.tile, BW=plan_w.tile, KH=plan_h.width, KW=plan_w.width,
        CP=triton.next_power_of_2(channels), IMAGES=per, BLOCK3D=block3d,
        num_warps=num_warps or NUM_WARPS)
    return out
