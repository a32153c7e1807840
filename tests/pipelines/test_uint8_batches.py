"""uint8 batches normalised where they land (a GPU in training; here the CPU path of the same
code) equal the float32 batches the workers would have made, bit for bit; in bf16 they are that
float32 batch rounded once to nearest even."""
import numpy as np
import pytest
import torch
from PIL import Image

from pgnm_fast.pipelines import open_source
from pgnm_fast.pipelines.loader import build_loader
from pgnm_fast.pipelines.transforms import MEAN, STD, normalise, to_tensor, to_uint8


def _float32_reference(a: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """The float32 batch element as the loaders computed it before uint8 batches."""
    x = torch.from_numpy(a.copy()).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).unsqueeze(0)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalise_equals_the_float32_transform(channels):
    rng = np.random.default_rng()
    a = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    a[0, :2] = (0, 255)
    img = Image.fromarray(a, mode="L")
    ref = _float32_reference(a).repeat(channels, 1, 1)
    assert torch.equal(normalise(to_uint8(img, channels)), ref)
    assert torch.equal(to_tensor(img, channels), ref)
    assert to_uint8(img, channels).dtype == torch.uint8


def test_normalise_in_bf16_is_the_float32_value_rounded_once():
    rng = np.random.default_rng()
    a = torch.from_numpy(rng.integers(0, 256, size=(4, 1, 16, 16), dtype=np.uint8))
    ref = normalise(a)
    got = normalise(a, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16))
    # stated rounding of bf16: relative error at most 2**-8
    assert ((got.float() - ref).abs() <= ref.abs() * 2.0 ** -8).all()


def test_normalise_keeps_channels_last():
    a = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    out = normalise(a)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalise(a.contiguous()))


@pytest.mark.parametrize("train", [True, False])
def test_loader_uint8_then_normalise_equals_float32_batches(synth_root, train):
    split = open_source(synth_root).split("train" if train else "val")
    common = dict(train=train, batch_size=8, crop_size=32, resize_size=40, workers=0, seed=7)
    plain = build_loader(split, **common, uint8=False)
    eight = build_loader(split, **common, uint8=True)
    assert eight.normalise_on is not None and plain.normalise_on is None

    def first_batches(loader, n=4):  # in-process augmentation draws from torch's global RNG
        torch.manual_seed(11)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
        return out
    got, want = first_batches(eight), first_batches(plain)
    assert len(got) == len(want) == 4
    for (x8, y8), (x, y) in zip(got, want):
        assert x8.dtype == torch.float32 and torch.equal(x8, x) and torch.equal(y8, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalise_on_the_gpu_equals_the_cpu_batch(dtype):
    """IEEE division and subtraction on the GPU: the same float32 values as on the CPU."""
    a = torch.randint(0, 256, (16, 1, 64, 64), dtype=torch.uint8)
    want = normalise(a, dtype=dtype)
    got = normalise(a.pin_memory().to("cuda", non_blocking=True), dtype=dtype).cpu()
    assert got.dtype == dtype and torch.equal(got, want)
