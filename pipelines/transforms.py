"""The image transforms of docs/method.md §1 on PIL images, with torchvision's semantics, without
torchvision.

Train (``ClassificationPresetTrain``): RandomResizedCrop(crop_size, scale 0.08-1, ratio 3/4-4/3,
bilinear) -> RandomHorizontalFlip(0.5) -> float in [0, 1] -> Normalize(mean, std).
Eval (``ClassificationPresetEval``): Resize(resize_size) of the shorter side (bilinear) ->
CenterCrop(crop_size) -> float -> Normalize. Output: float32 tensor [channels, crop, crop];
``channels=3`` repeats the grey channel (the authors feed 3 identical channels).

Random draws come from torch's global generator (or a ``generator`` passed to the transform), in
torchvision's order (scale, log-ratio, then top, left; then the flip), so DataLoader worker
seeding makes a run reproducible. The crop is cut out first and then resized, as torchvision's
``resized_crop`` does for PIL images (PIL's ``resize(box=...)`` would also read pixels just
outside the box at its edges).

Decoding (``load_grey``): every image becomes 8-bit grey (mode ``L``). RGB and palette images go
through PIL's ``convert("L")`` (ITU-R 601-2 luma). 16-bit and float images (modes ``I;16*``,
``I``, ``F``) are windowed per image by min-max: ``round((v - min) * 255 / (max - min))``, a
constant image becomes all 0. This keeps the full stored range, whatever the scanner's offset.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pgnm_fast.errors import DataError

MEAN = 0.3162
STD = 0.3213
BILINEAR = Image.Resampling.BILINEAR


def load_grey(path) -> Image.Image:
    """Open an image file as 8-bit grey (module docstring); DataError naming the file if it
    cannot be read or decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_grey(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: cannot decode image ({reason})") from None


def to_grey(im: Image.Image) -> Image.Image:
    if im.mode == "L":
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = np.zeros(a.shape) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA").convert("RGB")  # drop alpha, keep the stored colours
    return im.convert("L")


def grey_of(a: np.ndarray) -> np.ndarray:
    """``h x w x c`` uint8 -> ``h x w`` grey: as is, or PIL's ``convert("L")`` luma (exact
    integer form: (19595 R + 38470 G + 7471 B + 2^15) >> 16)."""
    if a.shape[2] == 1:
        return a[:, :, 0]
    rgb = a.astype(np.uint32)
    return ((19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 0x8000)
            >> 16).astype(np.uint8)


def _uniform(lo, hi, generator):
    return torch.empty(1).uniform_(lo, hi, generator=generator).item()


def _randint(hi, generator):
    return int(torch.randint(0, hi, size=(1,), generator=generator).item())


class RandomResizedCrop:
    """torchvision.transforms.RandomResizedCrop for PIL images (bilinear)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                 interpolation=BILINEAR):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation

    @staticmethod
    def get_params(img, scale, ratio, generator=None):
        """(top, left, height, width) of a random crop: up to 10 tries of an area drawn
        uniformly in ``scale`` x image area and an aspect ratio drawn log-uniformly in
        ``ratio``; if none fits, the largest centre crop with the aspect ratio clamped to
        ``ratio``."""
        width, height = img.size
        area = height * width
        # float32 log-ratio bounds and exp, as torchvision computes them: same seed, same crops
        log_lo, log_hi = torch.log(torch.tensor(ratio, dtype=torch.float32)).tolist()
        for _ in range(10):
            target_area = area * _uniform(scale[0], scale[1], generator)
            aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = _randint(height - h + 1, generator)
                j = _randint(width - w + 1, generator)
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, generator=None):
        i, j, h, w = self.get_params(img, self.scale, self.ratio, generator)
        return img.crop((j, i, j + w, i + h)).resize(self.size[::-1], self.interpolation)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, generator=None):
        if torch.rand(1, generator=generator).item() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class Resize:
    """Resize the shorter side to ``size`` (the longer side: ``int(size * long / short)``)."""

    def __init__(self, size, interpolation=BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.size, int(self.size * long / short)
        new = (new_short, new_long) if w <= h else (new_long, new_short)
        return img if new == (w, h) else img.resize(new, self.interpolation)


class CenterCrop:
    """Centre crop with torchvision's rounding (``int(round((H - h) / 2))``), zero padding for
    an image smaller than the crop."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)

    def __call__(self, img):
        ch, cw = self.size
        w, h = img.size
        if cw > w or ch > h:
            left, top = (cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0
            canvas = Image.new(img.mode, (max(w, cw), max(h, ch)), 0)
            canvas.paste(img, (left, top))
            img, (w, h) = canvas, canvas.size
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return img.crop((left, top, left + cw, top + ch))


# ----------------------------------------------------------------------------- crop rules
# The rules above as arrays over many images at once: the DALI and device loaders plan an
# epoch's crops with them.
def random_resized_crop_params(height: np.ndarray, width: np.ndarray, rng: np.random.Generator,
                               scale=(0.08, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
    """Vectorised ``RandomResizedCrop.get_params``: arrays ``(top, left, h, w)`` for images of
    the given sizes (the same rule, numpy's generator instead of torch's)."""
    height = np.asarray(height, np.int64)
    width = np.asarray(width, np.int64)
    n = len(height)
    area = (height * width).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(1)
    found = fits.any(1)
    rows = np.arange(n)
    # torchvision's fallback: the whole image, its aspect ratio clamped to `ratio`, centred
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = np.where(wide, np.rint(height * max(ratio)).astype(np.int64), width)
    fh = np.where(narrow, np.rint(width / min(ratio)).astype(np.int64), height)
    h = np.where(found, h[rows, first], fh)
    w = np.where(found, w[rows, first], fw)
    top = np.where(found, rng.integers(0, height - h + 1), (height - h) // 2)
    left = np.where(found, rng.integers(0, width - w + 1), (width - w) // 2)
    return top, left, h, w


def eval_params(height, width, crop_size: int, resize_size: int) -> tuple[np.ndarray, ...]:
    """torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)`` as arrays: the resized
    ``(rh, rw)`` and the crop's ``(top, left)`` in the resized image (negative: zero padding)."""
    height = np.asarray(height, np.int64)
    width = np.asarray(width, np.int64)
    short, long = np.minimum(height, width), np.maximum(height, width)
    new_long = (resize_size * long / short).astype(np.int64)  # int() of the float, as torchvision
    rh = np.where(width <= height, new_long, resize_size)
    rw = np.where(width <= height, resize_size, new_long)
    top = np.where(crop_size > rh, -((crop_size - rh) // 2),
                   np.rint((rh - crop_size) / 2.0).astype(np.int64))
    left = np.where(crop_size > rw, -((crop_size - rw) // 2),
                    np.rint((rw - crop_size) / 2.0).astype(np.int64))
    return rh, rw, top, left


def to_uint8(img, channels=1) -> torch.Tensor:
    """8-bit grey PIL image -> uint8 [channels, H, W], the pixels as they are (an RGB image with
    ``channels=3``: its own three channels)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 3:
        return torch.from_numpy(a.transpose(2, 0, 1).copy())
    x = torch.from_numpy(a.copy()).unsqueeze(0)
    return x.repeat(channels, 1, 1) if channels != 1 else x


def normalise(x: torch.Tensor, mean=MEAN, std=STD, dtype=torch.float32) -> torch.Tensor:
    """uint8 images of any shape, memory format and device -> ``(x / 255 - mean) / std``, computed
    in float32 in that order (so equal bit for bit to :func:`to_tensor`), then cast to ``dtype``
    (bf16: the float32 value rounded once to nearest even)."""
    x = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


def to_tensor(img, channels=1, mean=MEAN, std=STD) -> torch.Tensor:
    """8-bit grey PIL image -> float32 [channels, H, W], scaled to [0, 1] then normalised."""
    return normalise(to_uint8(img, channels), mean, std)


def _check(channels):
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


class ClassificationPresetTrain:
    """The training transform (torchvision reference name); call on a grey PIL image."""

    def __init__(self, *, crop_size=224, channels=1, mean=MEAN, std=STD, hflip_prob=0.5,
                 scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), uint8=False):
        _check(channels)
        self.crop = RandomResizedCrop(crop_size, scale, ratio)
        self.flip = RandomHorizontalFlip(hflip_prob)
        self.channels, self.mean, self.std, self.uint8 = channels, mean, std, uint8

    def __call__(self, img, generator=None):
        img = self.flip(self.crop(img, generator), generator)
        if self.uint8:  # normalised where the batch goes (normalise)
            return to_uint8(img, self.channels)
        return to_tensor(img, self.channels, self.mean, self.std)


class ClassificationPresetEval:
    """The evaluation transform (torchvision reference name); call on a grey PIL image."""

    def __init__(self, *, crop_size=224, resize_size=256, channels=1, mean=MEAN, std=STD,
                 uint8=False):
        _check(channels)
        self.resize, self.crop = Resize(resize_size), CenterCrop(crop_size)
        self.channels, self.mean, self.std, self.uint8 = channels, mean, std, uint8

    def __call__(self, img, generator=None):
        img = self.crop(self.resize(img))
        if self.uint8:
            return to_uint8(img, self.channels)
        return to_tensor(img, self.channels, self.mean, self.std)


def build_transform(train: bool, *, crop_size=224, resize_size=256, channels=1, mean=MEAN,
                    std=STD, uint8=False):
    """The train or eval preset; ``uint8``: it yields the uint8 pixels (see :func:`normalise`)."""
    if train:
        return ClassificationPresetTrain(crop_size=crop_size, channels=channels, mean=mean, std=std,
                                         uint8=uint8)
    return ClassificationPresetEval(crop_size=crop_size, resize_size=resize_size,
                                    channels=channels, mean=mean, std=std, uint8=uint8)
