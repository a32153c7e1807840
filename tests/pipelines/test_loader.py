"""Transforms (torchvision semantics, checked on constructed images and statistically) and the
plain PyTorch loader (shapes, drop_last, coverage, sharding, epochs, decode errors)."""
import gc
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest, kstest

from pgnm_fast.errors import DataError
from pgnm_fast.pipelines import build_loader, open_source
from pgnm_fast.pipelines.samplers import EpochSampler, EvalShardSampler
from pgnm_fast.pipelines.transforms import (
    MEAN,
    STD,
    CenterCrop,
    ClassificationPresetEval,
    ClassificationPresetTrain,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    load_grey,
    to_tensor,
)

LEVEL = 1e-3  # significance level of every statistical test here


def _img(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8))


def _norm(a):
    return (torch.from_numpy(np.asarray(a, dtype=np.float32)) / 255 - MEAN) / STD


# ----------------------------------------------------------------------------- crop parameters
def test_crop_area_and_log_ratio_are_uniform():
    """Where no try is rejected (scale up to 0.5 of a square image: the widest crop is
    sqrt(0.5 * 4/3) = 0.82 of the side), the area fraction is U(0.08, 0.5) and log(w/h) is
    U(log 3/4, log 4/3). KS tests at level 1e-3 with n = 4000 (critical distance 0.031): a
    plain-uniform aspect ratio would differ by 0.071 in CDF at ratio 1 and be rejected."""
    img, g = Image.new("L", (1000, 1000)), torch.Generator().manual_seed(11)
    params = np.array([RandomResizedCrop.get_params(img, (0.08, 0.5), (3 / 4, 4 / 3), g)
                       for _ in range(4000)])
    i, j, h, w = params.T
    area = h * w / 1e6
    assert area.min() >= 0.08 - 0.003 and area.max() <= 0.5 + 0.003
    assert kstest(area, "uniform", args=(0.08, 0.42)).pvalue > LEVEL
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert kstest(np.log(w / h), "uniform", args=(lo, hi - lo)).pvalue > LEVEL
    assert kstest((i + 0.5) / (1001 - h), "uniform").pvalue > LEVEL  # top offset uniform
    assert kstest((j + 0.5) / (1001 - w), "uniform").pvalue > LEVEL


def test_default_crops_fit_and_respect_bounds():
    img, g = Image.new("L", (320, 240)), torch.Generator().manual_seed(12)
    for _ in range(2000):
        i, j, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= i <= 240 - h and 0 <= j <= 320 - w and h > 0 and w > 0
        if (h, w) != (240, 320):  # not the centre-crop fallback
            assert 0.08 * 0.98 <= h * w / (320 * 240) <= 1.0
            assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02


def test_crop_fallback_is_torchvisions_centre_crop():
    g = torch.Generator().manual_seed(0)
    wide, tall = Image.new("L", (1000, 10)), Image.new("L", (10, 1000))
    # Every try asks for >= 9000 pixels in a 10-pixel-high image: all 10 fail.
    assert RandomResizedCrop.get_params(wide, (0.9, 1.0), (3 / 4, 4 / 3), g) == (0, 493, 10, 13)
    assert RandomResizedCrop.get_params(tall, (0.9, 1.0), (3 / 4, 4 / 3), g) == (493, 0, 13, 10)


def test_crop_draws_in_torchvisions_order():
    """Same generator state, same crop as torchvision: area, log-ratio, then top, then left."""
    img = Image.new("L", (400, 300))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    i, j, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3), g1)
    log_r = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        target = 120000 * torch.empty(1).uniform_(0.08, 1.0, generator=g2).item()
        ar = torch.exp(torch.empty(1).uniform_(log_r[0].item(), log_r[1].item(), generator=g2))
        ew, eh = round(math.sqrt(target * ar.item())), round(math.sqrt(target / ar.item()))
        if ew <= 400 and eh <= 300:
            break
    assert (h, w) == (eh, ew)
    assert i == torch.randint(0, 300 - eh + 1, (1,), generator=g2).item()
    assert j == torch.randint(0, 400 - ew + 1, (1,), generator=g2).item()


def test_flip_rate_and_content():
    """Binomial test of the flip rate against 0.5 at level 1e-3, n = 4000 (detects 0.45 with
    z = 6.3)."""
    img, g = _img(7, 9, 0), torch.Generator().manual_seed(3)
    a, mirrored = np.asarray(img), np.asarray(img)[:, ::-1]
    flips = 0
    for _ in range(4000):
        out = np.asarray(RandomHorizontalFlip(0.5)(img, g))
        flipped = np.array_equal(out, mirrored)
        assert flipped or np.array_equal(out, a)
        flips += flipped
    assert binomtest(flips, 4000, 0.5).pvalue > LEVEL


# ----------------------------------------------------------------------------- whole transforms
def test_train_transform_crops_then_resizes_bilinear():
    img = _img(90, 120, 1)
    t = ClassificationPresetTrain(crop_size=48, hflip_prob=0.0)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    i, j, h, w = RandomResizedCrop.get_params(img, t.crop.scale, t.crop.ratio, g1)
    out = t(img, g2)
    want = img.crop((j, i, j + w, i + h)).resize((48, 48), Image.Resampling.BILINEAR)
    assert out.dtype == torch.float32 and out.shape == (1, 48, 48)
    torch.testing.assert_close(out, _norm(want)[None], rtol=0, atol=1e-6)
    whole = ClassificationPresetTrain(crop_size=32, hflip_prob=0.0, scale=(1, 1), ratio=(1, 1))
    sq = _img(80, 80, 2)
    want = _norm(sq.resize((32, 32), Image.Resampling.BILINEAR))[None]
    torch.testing.assert_close(whole(sq), want, rtol=0, atol=1e-6)
    three = ClassificationPresetTrain(crop_size=32, channels=3)(sq)
    assert three.shape == (3, 32, 32) and torch.equal(three[0], three[2])


def test_eval_square_is_a_centre_slice():
    img = _img(256, 256, 3)
    out = ClassificationPresetEval(crop_size=224, resize_size=256)(img)
    torch.testing.assert_close(out[0], _norm(np.asarray(img)[16:240, 16:240]), rtol=0, atol=1e-6)
    three = ClassificationPresetEval(crop_size=224, resize_size=256, channels=3)(img)
    assert three.shape == (3, 224, 224) and torch.equal(three[1], out[0])
    # torchvision rounds the offset with Python's round(): 0.5 -> 0, 1.5 -> 2
    for side, off in ((225, 0), (227, 2)):
        im = _img(side, side, side)
        got = ClassificationPresetEval(crop_size=224, resize_size=side)(im)[0]
        torch.testing.assert_close(got, _norm(np.asarray(im)[off:off + 224, off:off + 224]),
                                   rtol=0, atol=1e-6)


def test_eval_non_square_shape_and_alignment():
    """A 300x200 horizontal ramp: shorter side to 256 gives 384x256, the centre crop starts at
    column 80; each output column must hold the ramp value of its source position."""
    ramp = np.tile(np.arange(300, dtype=np.float64) * 255 / 299, (200, 1))
    img = Image.fromarray(np.rint(ramp).astype(np.uint8))
    assert Resize(256)(img).size == (384, 256)
    assert Resize(256)(img.transpose(Image.Transpose.TRANSPOSE)).size == (256, 384)
    out = ClassificationPresetEval(crop_size=224, resize_size=256)(img)
    assert out.shape == (1, 224, 224)
    grey = (out[0] * STD + MEAN) * 255
    src_x = (np.arange(224) + 80 + 0.5) * 300 / 384 - 0.5
    np.testing.assert_allclose(grey.mean(0).numpy(), src_x * 255 / 299, atol=1.0)
    assert float(grey.std(0).max()) < 1e-3  # rows identical: no vertical shift mixes in


def test_centre_crop_pads_small_images_with_zeros():
    img = _img(48, 48, 4)
    out = np.asarray(CenterCrop(64)(img))
    assert out.shape == (64, 64)
    assert np.array_equal(out[8:56, 8:56], np.asarray(img)) and out[:8].max() == 0


def test_normalisation_constants():
    assert (MEAN, STD) == (0.3162, 0.3213)
    v = int(np.random.default_rng(5).integers(1, 255))
    x = to_tensor(Image.new("L", (4, 3), v))
    assert x.shape == (1, 3, 4) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((1, 3, 4), (v / 255 - 0.3162) / 0.3213),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- decoding
def test_sixteen_bit_min_max_window(tmp_path):
    rng = np.random.default_rng(6)
    a = rng.integers(1000, 40000, (20, 30)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode in ("I;16", "I")  # a real 16-bit PNG
    got = np.asarray(load_grey(tmp_path / "a.png")).astype(int)
    want = np.rint((a.astype(float) - a.min()) * 255 / (a.max() - a.min())).astype(int)
    assert np.array_equal(got, want) and got.min() == 0 and got.max() == 255
    Image.fromarray(np.full((5, 5), 777, np.uint16)).save(tmp_path / "flat.png")
    assert np.asarray(load_grey(tmp_path / "flat.png")).max() == 0


def test_colour_images_become_grey(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    rgb.save(tmp_path / "c.png")
    got = load_grey(tmp_path / "c.png")
    assert got.mode == "L" and np.array_equal(np.asarray(got), np.asarray(rgb.convert("L")))


def test_undecodable_files_raise_data_error(tmp_path):
    good = tmp_path / "good.png"
    _img(16, 16, 8).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png", "absent.png"):
        with pytest.raises(DataError) as info:
            load_grey(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the loader
def test_train_batches_fixed_shape_and_drop_last(synth_root):
    split = open_source(synth_root).split("train")
    loader = build_loader(split, train=True, batch_size=16, crop_size=32, resize_size=37,
                          workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == len(split) // 16 and len(split) % 16 != 0
    for x, y in batches:
        assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
        assert torch.isfinite(x).all() and 0 <= y.min() and y.max() < len(split.classes)
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) != sorted(split.labels.tolist())  # a partial batch was dropped
    x3, _ = next(iter(build_loader(split, train=True, batch_size=4, crop_size=24, channels=3,
                                   workers=0)))
    assert x3.shape == (4, 3, 24, 24) and torch.equal(x3[:, 0], x3[:, 2])


def test_eval_keeps_every_image_in_order(synth_root):
    split = open_source(synth_root).split("val")
    loader = build_loader(split, train=False, batch_size=20, crop_size=32, resize_size=37,
                          workers=0)
    xs, ys = zip(*loader)
    assert sum(len(y) for y in ys) == len(split) and len(split) % 20 != 0
    assert torch.cat(ys).tolist() == split.labels.tolist()
    assert all(x.shape[1:] == (1, 32, 32) for x in xs)
    again = torch.cat([x for x, _ in loader])
    assert torch.equal(again, torch.cat(xs))  # eval is deterministic


def test_eval_sharding_covers_each_image_once(synth_root):
    split = open_source(synth_root).split("test")
    got = []
    for rank in range(2):
        loader = build_loader(split, train=False, batch_size=8, crop_size=16, resize_size=18,
                              workers=0, rank=rank, world_size=2)
        assert list(loader.sampler) == list(range(rank, len(split), 2))
        ys = torch.cat([y for _, y in loader])
        assert ys.tolist() == split.labels[rank::2].tolist()
        got += list(loader.sampler)
    assert sorted(got) == list(range(len(split)))
    assert list(EvalShardSampler(7, 2, 1)) == [1, 3, 5]


@pytest.mark.parametrize("n", [40, 41])
def test_train_sharding_covers_each_index_once_per_epoch(n):
    """Two ranks, one epoch: every index at least once; with n odd exactly one index twice
    (DistributedSampler's documented padding), otherwise each exactly once."""
    shards = [list(EpochSampler(range(n), num_replicas=2, rank=r, seed=4)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(n / 2)
    counts = np.bincount(shards[0] + shards[1], minlength=n)
    assert counts.min() == 1 and counts.sum() - n == (2 * math.ceil(n / 2) - n)
    assert shards[0] != list(range(0, n, 2))  # shuffled


def test_epochs_reshuffle_with_or_without_set_epoch():
    s = EpochSampler(range(50), seed=1)
    s.set_epoch(3)
    e3 = list(s)
    s.set_epoch(3)
    assert list(s) == e3
    s.set_epoch(4)
    e4 = list(s)
    assert e4 != e3 and sorted(e4) == list(range(50))
    auto = EpochSampler(range(50), seed=1)
    first, second = list(auto), list(auto)  # no set_epoch: epoch 0, then 1
    ref = EpochSampler(range(50), seed=1)
    ref.set_epoch(1)
    assert first != second and second == list(ref)


def test_workers_reproducible_and_first_pass_is_epoch_zero(synth_root):
    split = open_source(synth_root).split("train")
    kw = dict(train=True, batch_size=16, crop_size=24, resize_size=27, workers=2, seed=7)
    a, b = build_loader(split, **kw), build_loader(split, **kw)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ref = EpochSampler(range(len(split)), seed=7)
    order0 = list(ref)
    assert ya.tolist() == split.labels[order0[:16]].tolist()
    ys1 = torch.cat([y for _, y in a])  # second pass over `a`, no set_epoch: epoch 1
    order1 = list(ref)
    assert ys1.tolist() == split.labels[order1[:len(ys1)]].tolist()
    c = build_loader(split, **{**kw, "seed": 8})
    assert not torch.equal(next(iter(c))[0], xa)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(synth_copy, workers):
    split = open_source(synth_copy).split("val")
    bad = split.files[5]
    with open(bad, "r+b") as f:
        f.truncate(50)
    loader = build_loader(split, train=False, batch_size=4, crop_size=16, workers=workers)
    msg = None
    try:
        for _ in loader:
            pass
    except DataError as e:  # raised in a worker, rebuilt in this process with a clean message
        msg = str(e)
    assert msg is not None and bad in msg and "cannot decode" in msg and "\n" not in msg, msg
    # PyTorch takes its 5 s worker-status interval to stop a worker that raised; pay it here
    del loader
    gc.collect()


def test_loader_argument_errors(synth_root):
    split = open_source(synth_root).split("val")
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(split, train=True, batch_size=len(split) + 1, crop_size=16, workers=0)
    with pytest.raises(ValueError, match="rank 2"):
        build_loader(split, train=False, batch_size=4, crop_size=16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="channels"):
        build_loader(split, train=False, batch_size=4, crop_size=16, channels=2)


def test_augmentation_is_a_function_of_seed_rank_epoch_and_index(synth_root):
    """Epoch 1 from two workers that already ran epoch 0 (persistent, as in training) equals
    epoch 1 from a fresh loader without workers (a run resumed at epoch 1)."""
    split = open_source(synth_root).split("train")
    kw = {"train": True, "batch_size": 16, "crop_size": 24, "resize_size": 27, "seed": 7}
    persistent = build_loader(split, workers=2, **kw)
    for epoch in range(2):
        persistent.sampler.set_epoch(epoch)
        ran_on = list(persistent)
    resumed = build_loader(split, workers=0, **kw)
    resumed.sampler.set_epoch(1)
    fresh = list(resumed)
    assert len(fresh) == len(ran_on)
    for (xa, ya), (xb, yb) in zip(ran_on, fresh):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_rank = build_loader(split, workers=0, rank=1, world_size=2, **kw)
    other_rank.sampler.set_epoch(1)
    assert not torch.equal(next(iter(other_rank))[0], fresh[0][0][:16])
    resumed.sampler.set_epoch(2)
    assert not torch.equal(next(iter(resumed))[0], fresh[0][0])
