"""Batched resized crop on tensors, pixel for pixel PIL's: RandomResizedCrop + flip + normalise
(train) and shorter-side resize + centre crop (eval) for the device-resident loader.

The images live in one flat uint8 tensor (grey, ``height x width`` row-major at ``base[i]``).
Each output image ``S x S`` is a window of a *virtual* resized image: the source box
``(top, left, h, w)`` resized to ``(out_h, out_w)``, read from virtual row ``offset_y`` and
column ``offset_x`` on (train: the crop box resized to ``S x S``, offsets 0; eval: the whole
image resized to torchvision's shorter-side size, offsets = the centre crop's corner, negative
where the centre crop pads with zeros).

Resampling is PIL's ``Image.resize(..., BILINEAR)`` of 8-bit images, exactly
(``libImaging/Resample.c``): per axis, output index ``i`` has centre ``c = (i + 0.5) * scale``
(``scale = in / out``), a triangle filter of support ``max(scale, 1)`` (so downscaling
antialiases), taps from ``trunc(c - support + 0.5)`` (clamped at 0) to
``trunc(c + support + 0.5)`` (clamped at ``in``), weights normalised in float64 and rounded to
22-bit fixed point; a horizontal pass into an 8-bit intermediate (round half up, clamped to
0..255), then a vertical pass over that. :func:`resample_tables` computes the taps (float64,
vectorised, on the images' device); :func:`resample_torch` and the Triton kernel
(:mod:`pgnm_fast.kernels.resized_crop`) run the same integer arithmetic, so both equal PIL
bit for bit. The CPU's fast path, :func:`resample_interpolate`, is torch's own antialiased
uint8 resize (PIL's rules, 16-bit weights), one image per task over a thread pool: within 1
grey level of the exact path. A horizontal flip reverses the column tables; normalisation is a 256-entry table
made by :func:`~pgnm_fast.pipelines.transforms.to_tensor`'s own float32 ops (:func:`value_table`),
so the output equals the plain loader's tensor exactly (bf16: that value rounded to nearest).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .transforms import MEAN, STD

IMPLS = ("auto", "triton", "torch", "interpolate")  # resized_crop's implementations
PRECISION_BITS = 22  # PIL's fixed point for 8-bit images (32 - 8 - 2)
HALF = 1 << (PRECISION_BITS - 1)


def taps(in_max: int, out_size: int) -> int:
    """PIL's kernel size ``2 ceil(support) + 1`` for resizing at most ``in_max`` pixels to
    ``out_size``: the fixed tap count of :func:`resample_tables`."""
    return 2 * math.ceil(max(in_max / out_size, 1.0)) + 1


def value_table(mean: float = MEAN, std: float = STD, dtype=torch.float32, device=None):
    """The normalised value of each grey level 0..255, by ``to_tensor``'s float32 ops."""
    x = torch.arange(256, dtype=torch.uint8).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).to(dtype=dtype, device=device)


def _axis(start, n_in, n_out, offset, size: int, k: int):
    """One axis's taps: absolute source indices and 22-bit weights, ``[B, size, k]`` int32 each
    (module docstring; an output index outside ``0..n_out-1`` gets all-zero weights)."""
    dev = n_in.device
    n_in_f, n_out_f = n_in.to(torch.float64)[:, None], n_out.to(torch.float64)[:, None]
    scale = n_in_f / n_out_f
    filterscale = scale.clamp(min=1.0)
    support = filterscale  # the triangle filter's support is 1
    ss = 1.0 / filterscale
    xx = torch.arange(size, device=dev, dtype=torch.int64)[None, :] + offset[:, None]
    inside = (xx >= 0) & (xx < n_out[:, None])
    center = (xx.to(torch.float64) + 0.5) * scale
    xmin = (center - support + 0.5).trunc().clamp(min=0)
    xmax = torch.minimum((center + support + 0.5).trunc(), n_in_f) - xmin
    w, total = [], torch.zeros_like(center)
    for x in range(k):
        v = ((xmin + x) - center + 0.5) * ss
        wx = torch.where(x < xmax, (1.0 - v.abs()).clamp(min=0.0), torch.zeros_like(v))
        total = total + wx  # in tap order, as PIL sums
        w.append(wx)
    w = torch.stack(w, -1)
    w = torch.where(total[..., None] != 0, w / total[..., None], w)
    coeff = (w * (1 << PRECISION_BITS) + 0.5).trunc().to(torch.int32)
    coeff = torch.where(inside[..., None], coeff, torch.zeros_like(coeff))
    pos = xmin.to(torch.int64)[..., None] + torch.arange(k, device=dev)
    pos = torch.minimum(pos, (n_in[:, None, None] - 1)).clamp(min=0)
    return (start[:, None, None] + pos).to(torch.int32), coeff


def resample_tables(box, out_hw, offset, flip, size: int, k: int):
    """Row and column taps of a batch: ``box`` ``[B, 4]`` (top, left, h, w) in the source,
    ``out_hw`` ``[B, 2]`` the virtual resized size, ``offset`` ``[B, 2]`` the output's corner in
    it, ``flip`` ``[B]`` bool. Returns ``(rows, row_w, cols, col_w)``, each ``[B, size, k]``
    int32; ``cols`` and ``col_w`` already mirrored where ``flip``."""
    box, out_hw, offset = box.to(torch.int64), out_hw.to(torch.int64), offset.to(torch.int64)
    rows, row_w = _axis(box[:, 0], box[:, 2], out_hw[:, 0], offset[:, 0], size, k)
    cols, col_w = _axis(box[:, 1], box[:, 3], out_hw[:, 1], offset[:, 1], size, k)
    f = flip.to(torch.bool)[:, None, None]
    return rows, row_w, torch.where(f, cols.flip(1), cols), torch.where(f, col_w.flip(1), col_w)


def _clip8(acc):
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def _dot(window, weights):
    """``HALF + sum_k window[..., k] * weights[..., k]`` in int32, one tap at a time (a
    broadcast multiply over the tap axis is several times slower on a CPU)."""
    acc = window[..., 0].to(torch.int32) * weights[..., 0]
    for kx in range(1, window.shape[-1]):
        acc += window[..., kx].to(torch.int32) * weights[..., kx]
    return acc.add_(HALF)


def resample_torch(data, base, stride, rows, row_w, cols, col_w):
    """Grey levels ``[B, S, S]`` int32: PIL's two passes (module docstring) over the taps of
    :func:`resample_tables`, as PIL runs them: the horizontal pass over each source row the
    vertical taps use (once per row, not per output row), then the vertical pass over those
    8-bit rows. A pixel's taps are consecutive (where their weight is not zero), so each pass
    reads them as one window of k values per output (``unfold`` + one ``index_select``).
    Taps whose weight is zero in every image are skipped. Reads the batch's row span and tap
    count to the host (a CPU path; CUDA runs the kernel)."""
    used = (row_w != 0).any(0).any(0) | (col_w != 0).any(0).any(0)
    k = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    B, S = rows.shape[:2]
    dev = data.device
    lo = rows[:, :, :k].amin((1, 2)).to(torch.int64)  # first and last source row of each image
    hi = rows[:, :, :k].amax((1, 2)).to(torch.int64)
    span = int((hi - lo).max()) + 1
    src = torch.minimum(lo[:, None] + torch.arange(span, device=dev), hi[:, None])
    start = (base[:, None] + src * stride[:, None])[:, :, None] + cols[:, None, :, 0].to(torch.int64)
    if int(start.max()) + k > data.numel():  # windows may run past the end (zero weights)
        data = torch.cat([data, data.new_zeros(k)])
    window = data.unfold(0, k, 1).index_select(0, start.reshape(-1)).view(B, span, S, k)
    h = _clip8(_dot(window, col_w[:, None])).to(torch.uint8).view(B * span, S)
    h = torch.cat([h, h.new_zeros(k, S)])  # the last rows' windows (zero weights)
    first = (rows[:, :, 0].to(torch.int64) - lo[:, None]).clamp(min=0) \
        + span * torch.arange(B, device=dev)[:, None]  # row of h of each output row's first tap
    window = h.unfold(0, k, 1).index_select(0, first.reshape(-1)).view(B, S, S, k)
    return _clip8(_dot(window, row_w[:, :, None]))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _one_thread(barrier):
    torch.get_num_threads()  # torch's per-thread set-up first (it would reset the count later)
    torch.set_num_threads(1)
    barrier.wait()  # every worker started and set up before the caller's count is restored


def _pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` worker threads, each running torch ops on one intra-op thread (one image per
    worker; a 2-thread op inside each of 2 workers waits on a descheduled thread whenever the
    machine is busy), the caller's intra-op thread count left as it was."""
    if threads not in _POOLS:
        caller = torch.get_num_threads()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="resized-crop")
        barrier = threading.Barrier(threads)
        for f in [pool.submit(_one_thread, barrier) for _ in range(threads)]:
            f.result()
        torch.set_num_threads(caller)  # the process-wide parts of set_num_threads, restored
        _POOLS[threads] = pool
    return _POOLS[threads]


def resample_interpolate(data, base, stride, box, out_hw, offset, flip, size: int,
                         threads: int | None = None, sink=None):
    """Grey levels ``[B, S, S]`` uint8 by torch's own antialiased bilinear resize of uint8
    images (``F.interpolate(..., mode="bilinear", antialias=True)``, PIL's filter, support
    and two 8-bit passes with 16-bit fixed-point weights instead of PIL's 22-bit ones): within
    1 grey level of :func:`resample_torch` and of PIL's ``resize`` (tested, a few percent of
    pixels differ). One image at a time (each crop its own size), ``threads`` at once in a
    pool of threads with one torch thread each (default: torch's intra-op thread count; the
    resize releases the GIL); deterministic. Same arguments as :func:`resample_tables`, on the
    CPU. ``sink``: called as ``sink(i, grey_i)`` in the worker for each image instead (then
    returns None)."""
    B, S = len(box), size
    grey = torch.empty((B, S, S), dtype=torch.uint8) if sink is None else None
    rows = zip(*(t.to(torch.int64).tolist() for t in (base, stride, box, out_hw, offset)),
               flip.to(torch.bool).tolist())

    def one(i, row):
        first, step, (top, left, h, w), (oh, ow), (oy, ox), flipped = row
        img = data.as_strided((1, 1, h, w), (h * step, h * step, step, 1),
                              data.storage_offset() + first + top * step + left)
        if (h, w) != (oh, ow):
            img = torch.nn.functional.interpolate(img, size=(oh, ow), mode="bilinear",
                                                  antialias=True, align_corners=False)
        y0, y1, x0, x1 = max(oy, 0), min(oy + S, oh), max(ox, 0), min(ox + S, ow)
        if (y0, y1, x0, x1) == (oy, oy + S, ox, ox + S):  # no padding (train)
            g = img[0, 0, y0:y1, x0:x1]
            g = g.flip(-1) if flipped else g
        else:  # an eval window that leaves the image: level 0 around it
            g = torch.zeros((S, S), dtype=torch.uint8)
            if y1 > y0 and x1 > x0:
                window = img[0, 0, y0:y1, x0:x1]
                if flipped:  # output column j shows window column S - 1 - j
                    g[y0 - oy:y1 - oy, S - (x1 - ox):S - (x0 - ox)] = window.flip(-1)
                else:
                    g[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = window
        if sink is None:
            grey[i].copy_(g)
        else:
            sink(i, g)

    threads = threads or torch.get_num_threads()
    if B == 1 or (threads == 1 and torch.get_num_threads() == 1):
        for i, row in enumerate(rows):
            one(i, row)
    else:
        inference = torch.is_inference_mode_enabled()  # thread-local: the caller's, in each worker

        def task(i, row):
            with torch.inference_mode(inference):
                one(i, row)

        list(_pool(threads).map(task, range(B), rows))
    return grey


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")


def resized_crop(out, data, base, stride, box, out_hw, offset, flip, table, k: int,
                 impl: str = "auto", threads: int | None = None):
    """Write the batch's normalised crops into ``out`` (``[B, C, S, S]``, any strides and
    float dtype; ``table``: :func:`value_table` in ``out``'s dtype). ``impl``: ``"triton"``
    (the kernel, CUDA or the Triton interpreter), ``"torch"`` (:func:`resample_torch`, PIL's
    integer math exactly: the kernel's reference), ``"interpolate"``
    (:func:`resample_interpolate`, CPU, within 1 grey level; ``threads``), or ``"auto"``
    (Triton on CUDA, interpolate on the CPU). No host synchronisation on CUDA."""
    check_impl(impl)
    B, C, S = out.shape[0], out.shape[1], out.shape[2]
    if impl == "auto":
        impl = "triton" if data.device.type == "cuda" else "interpolate"
    if impl == "interpolate":  # the lookup in each worker, on its image
        def sink(i, grey):
            values = torch.index_select(table, 0, grey.reshape(-1).to(torch.int64))
            out[i].copy_(values.view(1, S, S).expand(C, S, S))

        resample_interpolate(data, base, stride, box, out_hw, offset, flip, S, threads, sink)
        return out
    rows, row_w, cols, col_w = resample_tables(box, out_hw, offset, flip, S, k)
    if impl == "triton":
        from pgnm_fast.kernels.resized_crop import resample_normalise
        return resample_normalise(out, data, base, stride, rows, row_w, cols, col_w, table)
    grey = resample_torch(data, base, stride, rows, row_w, cols, col_w)
    out.copy_(table[grey].unsqueeze(1).expand(B, C, S, S))
    return out
