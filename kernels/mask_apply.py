"""The PGNM mask_apply op (docs/method.md §3): images * (A_h @ m @ A_w^T), as a Triton kernel with its
launcher and in plain torch for the CPU (:func:`mask_apply_torch`).

One program per (tile of BH x BW output pixels, group of IMAGES images). For each image it forms
its tile of the mask from the bands of A_h, A_w and m the tile needs (see :mod:`.mask_plan`; a few
KiB, cache-resident) with two float32-exact dots (``input_precision="ieee"``) and multiplies every
channel of the tile by it: each image element is read once and written once, the mask never goes
to memory. float32 math whatever the image dtype (float32, bfloat16, float16), stored in the
image's dtype rounded to nearest even.

The image tile is one (C, BH, BW) block (C padded to a power of two, masked) addressed by strides,
so NCHW, channels-last and strided views share the code (the compiler vectorises along whichever
axis has unit stride); the output may have its own layout. The next image's block is loaded before
the current mask is formed (a software prefetch), so a program keeps its loads in flight while it
computes: the kernel is bound by memory, not by the two small dots.
"""
from __future__ import annotations

import torch

from .special import cast_for_store, tl, triton


@triton.jit
def _mask_apply_kernel(x_ptr, y_ptr, m_ptr, ah_ptr, aw_ptr, hs_ptr, ws_ptr,
                       B, H, W, G,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       C: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       CP: tl.constexpr, IMAGES: tl.constexpr):
    tw = tl.program_id(0)
    th = tl.program_id(1)
    first = tl.program_id(2).to(tl.int64) * IMAGES
    rows = th * BH + tl.arange(0, BH)
    cols = tw * BW + tl.arange(0, BW)
    ch = tl.arange(0, CP)
    kh = tl.load(hs_ptr + th) + tl.arange(0, KH)
    kw = tl.load(ws_ptr + tw) + tl.arange(0, KW)
    inside = (ch < C)[:, None, None] & (rows < H)[None, :, None] & (cols < W)[None, None, :]
    x_offs = ch[:, None, None] * sxc + rows[None, :, None] * sxh + cols[None, None, :] * sxw
    y_offs = ch[:, None, None] * syc + rows[None, :, None] * syh + cols[None, None, :] * syw
    a_h_offs = rows[:, None] * G + kh[None, :]
    a_h_in = (rows < H)[:, None] & (kh < G)[None, :]
    a_wt_offs = cols[None, :] * G + kw[:, None]
    a_wt_in = (kw < G)[:, None] & (cols < W)[None, :]
    m_offs = kh[:, None] * G + kw[None, :]
    m_in = (kh < G)[:, None] & (kw < G)[None, :]
    # image-in-range tests as blocks (the interpreter mishandles block & scalar masks)
    zc = ch.to(tl.int64) * 0
    zk = kh.to(tl.int64) * 0
    x_next = tl.load(x_ptr + first * sxb + x_offs, mask=inside & (zc + first < B)[:, None, None], other=0.0)
    for i in range(IMAGES):
        img = first + i
        x = x_next
        # prefetch the next image of the group while this one's mask is formed
        nxt = zc + img + 1
        x_next = tl.load(x_ptr + (img + 1) * sxb + x_offs,
                         mask=inside & ((nxt < B) & (nxt < first + IMAGES))[:, None, None], other=0.0)
        a_h = tl.load(ah_ptr + a_h_offs, mask=a_h_in, other=0.0)
        m = tl.load(m_ptr + img * G * G + m_offs, mask=m_in & (zk + img < B)[:, None], other=0.0)
        a_wt = tl.load(aw_ptr + a_wt_offs, mask=a_wt_in, other=0.0)
        mask = tl.dot(tl.dot(a_h, m, input_precision="ieee"), a_wt, input_precision="ieee")
        y = x.to(tl.float32) * mask[None, :, :]
        tl.store(y_ptr + img * syb + y_offs, cast_for_store(y, y_ptr), mask=inside & (zc + img < B)[:, None, None])

# Launch settings for compiled runs (the interpreter ignores them), chosen without a GPU at hand
# from ptxas on sm_90 with the runtime's specialisations (NCHW bf16, 32 x 32 tiles (mask_plan.TILE),
# 8 warps: 64 registers for C = 1, 86 for C = 3, no spills); bench/bench_kernels.py sweeps
# alternatives on a GPU and records which is fastest.
IMAGES_PER_PROGRAM = 4
NUM_WARPS = 8


def launch_mask_apply(images, out, m, plan_h, plan_w, starts_h, starts_w, a_h, a_w,
          images_per_program: int | None = None, num_warps: int | None = None):
    """Launch the apply kernel: ``out`` (same shape as ``images``) gets images * mask(m).

    ``plan_*`` give the tile and band sizes; ``starts_*``, ``a_*`` are their tensors on the
    images' device (the masker keeps them as buffers)."""
    batch, channels, height, width = images.shape
    grid = a_h.shape[1]
    per = images_per_program or IMAGES_PER_PROGRAM
    launch = (triton.cdiv(width, plan_w.tile), triton.cdiv(height, plan_h.tile), triton.cdiv(batch, per))
    _mask_apply_kernel[launch](
        images, out, m, a_h, a_w, starts_h, starts_w,
        batch, height, width, grid,
        *images.stride(), *out.stride(),
        C=channels, BH=plan_h.tile, BW=plan_w.tile, KH=plan_h.width, KW=plan_w.width,
        CP=triton.next_power_of_2(channels), IMAGES=per,
        num_warps=num_warps or NUM_WARPS)
    return out


def mask_apply_torch(images: torch.Tensor, m: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """The CPU path: images * (A_h @ m @ A_w^T), broadcast over channels, float32 math, the images'
    dtype and layout."""
    grid = a_h.shape[1]
    with torch.autocast(images.device.type, enabled=False):
        mask = torch.matmul(torch.matmul(a_h, m.view(-1, grid, grid)), a_w.t()).unsqueeze(1)
        out = torch.empty_like(images)  # keeps channels-last; bf16 * float32 is computed in float32
        return torch.mul(images, mask, out=out)
