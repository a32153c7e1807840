"""The device loader's augmentation op: PIL's bilinear resize as integer taps, in torch and as a
Triton kernel (CPU: under TRITON_INTERPRET=1, float32 only, the interpreter has no bf16 math).

Deterministic math, so deterministic comparisons on fresh random images and boxes: the torch
version equals Pillow's horizontal-then-vertical passes exactly and Pillow's own resize within
1 grey level; the kernel equals the torch version bit for bit (on a GPU: compiled, against the
torch version on the CPU)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pgnm_fast.pipelines.augment import (
    resample_interpolate,
    resample_tables,
    resample_torch,
    resized_crop,
    taps,
    value_table,
)
from pgnm_fast.pipelines.transforms import to_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: compiled, or interpreted


def _batch(rng, n, lo=4, hi=90):
    """n random grey images of random sizes in one flat tensor, with their bases and widths."""
    hs, ws = rng.integers(lo, hi, n), rng.integers(lo, hi, n)
    imgs = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in zip(hs, ws)]
    # half of them smooth (PIL-upscaled noise), so rounding ties are exercised too
    imgs = [np.asarray(Image.fromarray(a[: max(2, h // 3), : max(2, w // 3)]).resize((w, h)))
            if i % 2 else a for i, (a, h, w) in enumerate(zip(imgs, hs, ws))]
    base = np.concatenate([[0], np.cumsum(hs * ws)[:-1]])
    data = torch.from_numpy(np.concatenate([a.ravel() for a in imgs]))
    return imgs, data, torch.from_numpy(base.astype(np.int64)), torch.from_numpy(ws.astype(np.int64))


def _boxes(rng, imgs):
    out = []
    for a in imgs:
        h, w = a.shape
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        out.append([int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw])
    return torch.tensor(out)


def _pil_two_pass(a, box, size, flip):
    top, left, h, w = box
    crop = Image.fromarray(a).crop((left, top, left + w, top + h))
    out = crop.resize((size, h), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    direct = crop.resize((size, size), Image.BILINEAR)
    if flip:
        out, direct = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (out, direct))
    return np.asarray(out), np.asarray(direct)


@pytest.mark.parametrize("size", [7, 24, 61])
def test_torch_resample_is_pils_bilinear(size):
    """Exact against Pillow's two passes (horizontal first, 8-bit in between), within 1 grey
    level of ``Image.resize`` (Pillow 13 runs the vertical pass first for some shapes); crops
    both shrunk (antialiased) and enlarged, flipped or not."""
    rng = np.random.default_rng()
    imgs, data, base, width = _batch(rng, 24)
    box = _boxes(rng, imgs)
    flip = torch.from_numpy(rng.random(len(imgs)) < 0.5)
    k = taps(max(max(a.shape) for a in imgs), size)
    tables = resample_tables(box, torch.full((len(imgs), 2), size), torch.zeros(len(imgs), 2),
                             flip, size, k)
    got = resample_torch(data, base, width, *tables).numpy()
    differing = 0
    for i, a in enumerate(imgs):
        two, direct = _pil_two_pass(a, box[i].tolist(), size, bool(flip[i]))
        np.testing.assert_array_equal(got[i], two, err_msg=f"image {i} {a.shape} box {box[i]}")
        assert np.abs(got[i].astype(int) - direct).max() <= 1
        differing += int((got[i] != direct).sum())
    assert differing <= 0.25 * got.size


@pytest.mark.parametrize("size", [7, 24, 61])
def test_interpolate_is_within_one_level_of_pil_and_the_exact_path(size):
    """The CPU's fast path (torch's uint8 antialiased resize) on fresh random images and crops,
    shrunk and enlarged, flipped or not: within 1 grey level of Pillow's ``resize`` (the plain
    loader) and of the exact path, and at most 20% of the pixels apart from either (a
    misplaced tap or a half-pixel shift would move most of them; measured over 150 seeded
    batches at size 24: mean 5.5%, at most 10.5% apart from Pillow's two passes, at most 1%
    from the exact path)."""
    rng = np.random.default_rng()
    imgs, data, base, width = _batch(rng, 24)
    box = _boxes(rng, imgs)
    n = len(imgs)
    flip = torch.from_numpy(rng.random(n) < 0.5)
    out_hw, offset = torch.full((n, 2), size), torch.zeros(n, 2, dtype=torch.int64)
    fast = resample_interpolate(data, base, width, box, out_hw, offset, flip, size,
                                threads=int(rng.integers(1, 4))).numpy().astype(int)
    k = taps(max(max(a.shape) for a in imgs), size)
    exact = resample_torch(data, base, width, *resample_tables(box, out_hw, offset, flip, size,
                                                               k)).numpy()
    direct = np.stack([_pil_two_pass(a, box[i].tolist(), size, bool(flip[i]))[1]
                       for i, a in enumerate(imgs)]).astype(int)
    for ref in (exact, direct):
        assert np.abs(fast - ref).max() <= 1
        assert (fast != ref).mean() <= 0.20


def test_interpolate_eval_windows_pad_like_the_exact_path():
    """Eval-like windows of a whole image resized to a random size (padding where the window
    leaves it), flipped or not: padding is level 0 exactly, the rest within 1 level of the
    exact path."""
    rng = np.random.default_rng()
    size = 33
    data, base, width, box, out_hw, offset, flip, k = _kernel_inputs(rng, 12, size, True)
    fast = resample_interpolate(data, base, width, box, out_hw, offset, flip, size).numpy()
    exact = resample_torch(data, base, width, *resample_tables(box, out_hw, offset, flip, size,
                                                               k)).numpy()
    assert np.abs(fast.astype(int) - exact).max() <= 1
    for i in range(len(box)):
        oy, ox = offset[i].tolist()
        oh, ow = out_hw[i].tolist()
        ys, xs = np.arange(size) + oy, np.arange(size) + ox
        pad = ~((ys >= 0) & (ys < oh))[:, None] | ~((xs >= 0) & (xs < ow))[None, :]
        pad = pad[:, ::-1] if flip[i] else pad
        assert (fast[i][pad] == 0).all() and (exact[i][pad] == 0).all()


def test_interpolate_is_the_same_on_any_number_of_threads_and_in_inference_mode():
    """The worker threads write into the caller's tensor under the caller's inference mode
    (validation runs under ``torch.inference_mode``); thread count does not change a pixel."""
    rng = np.random.default_rng()
    args = _kernel_inputs(rng, 9, 20, False)
    outs = []
    for threads in (1, 2, 3):
        with torch.inference_mode():
            out = torch.empty(9, 3, 20, 20)
            resized_crop(out, *args[:-1], value_table(), args[-1], impl="interpolate",
                         threads=threads)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    grey = resample_interpolate(*args[:-1], 20)
    assert torch.equal(outs[0], value_table()[grey.long()].unsqueeze(1).expand(9, 3, 20, 20))


def test_value_table_is_to_tensors_normalisation():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert torch.equal(value_table()[torch.from_numpy(levels).long()], to_tensor(levels)[0])


def _kernel_inputs(rng, b, size, eval_like):
    imgs, data, base, width = _batch(rng, b, lo=3, hi=70)
    n = len(imgs)
    if eval_like:  # whole image to a random virtual size, a window of it (padding included)
        box = torch.tensor([[0, 0, *a.shape] for a in imgs])
        out_hw = torch.from_numpy(rng.integers(size // 2, 2 * size, (n, 2)))
        offset = torch.from_numpy(rng.integers(-size // 3, size, (n, 2)))
    else:
        box, out_hw, offset = _boxes(rng, imgs), torch.full((n, 2), size), torch.zeros(n, 2)
    flip = torch.from_numpy(rng.random(n) < 0.5)
    k = taps(70, size // 2)
    return data, base, width, box, out_hw, offset, flip, k


@pytest.mark.parametrize("channels,channels_last,eval_like",
                         [(1, False, False), (3, True, False), (3, False, True)])
@pytest.mark.slow
def test_triton_kernel_equals_torch(channels, channels_last, eval_like):
    rng = np.random.default_rng()
    size = 40  # not a multiple of the kernel's 32-pixel tiles: partial tiles on both axes
    args = _kernel_inputs(rng, 5, size, eval_like)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs = []
    for impl, dev in (("torch", "cpu"), ("triton", DEVICE)):
        out = torch.full((5, channels, size, size), float("nan"), device=dev)
        out = out.contiguous(memory_format=fmt)
        resized_crop(out, *(a.to(dev) for a in args[:-1]), value_table(device=dev), args[-1],
                     impl=impl)
        outs.append(out.cpu())
    assert not outs[1].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_eval_window_pads_with_zero_level_and_bf16_rounds_the_float32_value():
    rng = np.random.default_rng()
    data, base, width, box, out_hw, offset, flip, k = _kernel_inputs(rng, 4, 16, True)
    offset = torch.full_like(offset, -5)  # 5 rows and columns of padding
    f32 = torch.empty(4, 1, 16, 16)
    resized_crop(f32, data, base, width, box, out_hw, offset, flip, value_table(), k)
    assert torch.equal(f32[:, :, :5], torch.full_like(f32[:, :, :5], float(value_table()[0])))
    bf = torch.empty(4, 1, 16, 16, dtype=torch.bfloat16)
    resized_crop(bf, data, base, width, box, out_hw, offset, flip,
                 value_table(dtype=torch.bfloat16), k)
    assert torch.equal(bf, f32.to(torch.bfloat16))


@pytest.mark.gpu  # bf16 kernel arithmetic: the interpreter has none
def test_compiled_kernel_bf16_channels_last_equals_the_rounded_float32_values():
    rng = np.random.default_rng()
    args = _kernel_inputs(rng, 6, 224, False)
    ref = torch.empty(6, 1, 224, 224)
    resized_crop(ref, *args[:-1], value_table(), args[-1], impl="torch")
    out = torch.empty(6, 3, 224, 224, dtype=torch.bfloat16, device="cuda",
                      memory_format=torch.channels_last)
    resized_crop(out, *(a.cuda() for a in args[:-1]), value_table(dtype=torch.bfloat16,
                                                                  device="cuda"), args[-1])
    assert torch.equal(out.cpu(), ref.expand(6, 3, 224, 224).to(torch.bfloat16))
