"""DALI pipelines (CPU-only here; the GPU variant's tests are marked gpu): crop parameters by
torchvision's rules, outputs equal to the PIL transforms given the same parameters (up to the
stated interpolation differences), the plain loader's sample order, layouts, sharding, epochs
and resume, output forms, bad files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest, ks_2samp, kstest

pytest.importorskip("nvidia.dali")

from click.testing import CliRunner  # noqa: E402

from pgnm_fast.cli import main  # noqa: E402
from pgnm_fast.errors import DataError  # noqa: E402
from pgnm_fast.pipelines import make_loader, open_source  # noqa: E402
from pgnm_fast.pipelines.dali import DaliLoader  # noqa: E402
from pgnm_fast.pipelines.loader import build_loader  # noqa: E402
from pgnm_fast.pipelines.samplers import EpochSampler  # noqa: E402
from pgnm_fast.pipelines.transforms import (  # noqa: E402
    MEAN,
    STD,
    CenterCrop,
    ClassificationPresetEval,
    RandomResizedCrop,
    Resize,
    eval_params,
    load_grey,
    random_resized_crop_params,
)

LEVEL = 1e-3           # significance level of every statistical test here
GREY = 1 / (255 * STD)  # one grey level in normalised units
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def quiet(*_):
    pass


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def grey_levels(x):
    """Normalised images back to grey levels (float)."""
    return (x.double() * STD + MEAN) * 255


# ----------------------------------------------------------------------------- parameters
def test_crop_parameters_follow_torchvisions_distribution():
    """Two-sample KS tests (level 1e-3, n = 4000 each: detects a CDF distance of 0.044) of the
    numpy draws against RandomResizedCrop.get_params on a 320x240 image, default scale and
    ratio (where tries get rejected and the fallback matters): area fraction, log aspect
    ratio and the normalised top/left offsets."""
    n, g = 4000, torch.Generator().manual_seed(21)
    img = Image.new("L", (320, 240))
    ref = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3), g)
                    for _ in range(n)])
    top, left, h, w = random_resized_crop_params(np.full(n, 240), np.full(n, 320),
                                                 np.random.default_rng(22))
    ours = np.stack([top, left, h, w], 1)
    for p in (ours, ref):
        assert (p[:, 0] >= 0).all() and (p[:, 0] + p[:, 2] <= 240).all()
        assert (p[:, 1] >= 0).all() and (p[:, 1] + p[:, 3] <= 320).all()

    def stats(p):
        return (p[:, 2] * p[:, 3] / 76800, np.log(p[:, 3] / p[:, 2]),
                (p[:, 0] + 0.5) / (241 - p[:, 2]), (p[:, 1] + 0.5) / (321 - p[:, 3]))

    for a, b in zip(stats(ours), stats(ref)):
        assert ks_2samp(a, b).pvalue > LEVEL
    # where no try is rejected the area and log-ratio are exactly uniform (one-sample KS)
    top, left, h, w = random_resized_crop_params(np.full(n, 1000), np.full(n, 1000),
                                                 np.random.default_rng(23), scale=(0.08, 0.5))
    assert kstest(h * w / 1e6, "uniform", args=(0.08, 0.42)).pvalue > LEVEL
    lo, hi = np.log(3 / 4), np.log(4 / 3)
    assert kstest(np.log(w / h), "uniform", args=(lo, hi - lo)).pvalue > LEVEL


def test_crop_fallback_and_flip_rate():
    rng = np.random.default_rng(0)
    # every try asks for >= 9000 pixels of a 10-pixel-high image: torchvision's centre crop
    got = random_resized_crop_params(np.array([10, 1000]), np.array([1000, 10]), rng,
                                     scale=(0.9, 1.0))
    assert [tuple(int(v[i]) for v in got) for i in range(2)] == [(0, 493, 10, 13), (493, 0, 13, 10)]
    sq = random_resized_crop_params(np.array([50]), np.array([50]), rng, scale=(1.0, 1.0),
                                    ratio=(1.0, 1.0))
    assert [int(v[0]) for v in sq] == [0, 0, 50, 50]


def test_flip_rate_of_the_train_plans(synth_root):
    """Binomial test of the flip rate against 0.5 over 30 epochs of plans (4320 draws, level
    1e-3: a rate of 0.45 would give z = 6.6)."""
    loader = DaliLoader(open_source(synth_root).split("train"), train=True, batch_size=16,
                        crop_size=24)
    flips = np.concatenate([b.mirror for _ in range(30) for b in loader.plan_epoch()])
    assert len(flips) == 30 * 144 and set(np.unique(flips)) == {0, 1}
    assert binomtest(int(flips.sum()), len(flips), 0.5).pvalue > LEVEL


def test_eval_parameters_are_torchvisions_resize_and_centre_crop():
    """Against transforms.Resize and CenterCrop on blank images of many shapes, including
    images that end up smaller than the crop (zero padding) and odd margins (round half to
    even)."""
    rng = np.random.default_rng(5)
    shapes = [(int(h), int(w)) for h, w in rng.integers(10, 400, (60, 2))] + \
        [(224, 224), (225, 225), (227, 227), (300, 200), (200, 300), (20, 300)]
    for crop, resize in ((224, 256), (32, 37), (64, 64)):
        hs, ws = np.array([s[0] for s in shapes]), np.array([s[1] for s in shapes])
        rh, rw, top, left = eval_params(hs, ws, crop, resize)
        for k, (h, w) in enumerate(shapes):
            resized = Resize(resize)(Image.new("L", (w, h)))
            assert resized.size == (rw[k], rh[k]), (h, w)
            # a position-coded image (never 0), centre-cropped by torchvision's rule ...
            rows, cols = np.mgrid[0:rh[k], 0:rw[k]]
            coded = ((rows * 7 + cols * 13) % 251 + 1).astype(np.uint8)
            got = np.asarray(CenterCrop(crop)(Image.fromarray(coded)))
            # ... equals the slice at (top, left), zeros outside the image
            want = np.zeros((crop, crop), np.uint8)
            r0, c0 = max(0, -top[k]), max(0, -left[k])
            r1, c1 = min(crop, rh[k] - top[k]), min(crop, rw[k] - left[k])
            want[r0:r1, c0:c1] = coded[top[k] + r0:top[k] + r1, left[k] + c0:left[k] + c1]
            assert np.array_equal(got, want), (h, w, crop, resize)


# ----------------------------------------------------------------------------- pixels
def _plan(loader, epoch):
    loader.set_epoch(epoch)
    plan = loader.plan_epoch()
    loader.set_epoch(epoch)
    return plan


@pytest.mark.parametrize("crop,bound", [(64, 1.0), (24, None)])
def test_train_images_equal_pil_given_the_same_crop_and_flip(synth_root, crop, bound):
    """Each DALI train image equals PIL crop -> bilinear resize -> flip -> normalise with the
    plan's parameters. Enlarging (48-pixel images to 64): at most 1 grey level (rounding).
    Shrinking (crops up to 48 pixels to 24): DALI's and PIL's antialias filters differ a
    little: mean under 1 grey level, no pixel off by more than 16 on these noisy images."""
    split = open_source(synth_root).split("train")
    loader = DaliLoader(split, train=True, batch_size=32, crop_size=crop, seed=3, threads=2)
    plan = _plan(loader, 2)
    got = batches(loader)
    assert len(got) == len(plan) == len(split) // 32
    mirrored = 0
    diffs = []
    for (x, y), b in zip(got, plan):
        assert torch.equal(y, torch.from_numpy(split.labels[b.indices]))
        for k, i in enumerate(b.indices):
            (top, left), (h, w) = b.anchor[k], b.shape[k]
            im = load_grey(split.files[i]).crop((left, top, left + w, top + h))
            im = im.resize((crop, crop), Image.Resampling.BILINEAR)
            if b.mirror[k]:
                im, mirrored = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mirrored + 1
            diffs.append(np.abs(grey_levels(x[k, 0]).numpy() - np.asarray(im, np.float64)))
    diffs = np.stack(diffs)
    assert 0 < mirrored < len(diffs)
    if bound is not None:
        assert diffs.max() <= bound + 1e-3
    else:
        assert diffs.mean() < 1.0 and diffs.max() <= 16


def test_eval_images_equal_the_plain_loaders(synth_root, tmp_path):
    """Eval: DALI and the plain loader give the same images, exactly when the resize keeps
    the size (48 -> 48, a centre slice), within 1 grey level when enlarging (48 -> 60), and
    within the antialias difference when shrinking (48 -> 37); the same labels in order."""
    split = open_source(synth_root).split("val")
    for crop, resize, tol in ((40, 48, 0.0), (56, 60, 1.0), (32, 37, None)):
        kw = dict(train=False, batch_size=20, crop_size=crop, resize_size=resize)
        ref = batches(build_loader(split, **kw, workers=0))
        ours = batches(DaliLoader(split, **kw, threads=2))
        assert [len(y) for _, y in ours] == [len(y) for _, y in ref] == [20, 20, 8]
        x_ref, x = torch.cat([b[0] for b in ref]), torch.cat([b[0] for b in ours])
        assert torch.equal(torch.cat([b[1] for b in ours]), torch.from_numpy(split.labels))
        d = (grey_levels(x) - grey_levels(x_ref)).abs()
        if tol is None:
            assert d.mean() < 1.0 and d.max() <= 16
        else:
            assert d.max() <= tol + 1e-3, (crop, resize, float(d.max()))
    # a non-square image smaller than the crop: zero padding where torchvision pads
    rng = np.random.default_rng(8)
    a = rng.integers(0, 256, (30, 21), np.uint8)
    (tmp_path / "train" / "x").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(a).save(tmp_path / "train" / "x" / f"{k}.png")
    small = open_source(tmp_path).split("train")
    x = next(iter(DaliLoader(small, train=False, batch_size=3, crop_size=40, resize_size=21)))[0]
    want = ClassificationPresetEval(crop_size=40, resize_size=21)(Image.fromarray(a))
    assert torch.allclose(x[0], want, atol=1e-5)


# ----------------------------------------------------------------------------- order, layouts
def test_every_layout_yields_the_same_batches(synth_root, synth_folders_root, packed):
    """RadImageNet CSVs, class folders and the packed cache: the same images and labels; from
    the CSVs and the cache (same order) bit-identical train batches for the same seed."""
    kw = dict(train=False, batch_size=16, crop_size=32, resize_size=36, threads=2)
    by_name = []
    for root in (synth_root, synth_folders_root, packed):
        split = open_source(root).split("test")
        x = torch.cat([b[0] for b in batches(DaliLoader(split, **kw))])
        by_name.append({Path(f).name: (x[k], int(split.labels[k]))
                        for k, f in enumerate(split.files)})
    assert by_name[0].keys() == by_name[1].keys() == by_name[2].keys()
    for name, (x, y) in by_name[0].items():
        for other in by_name[1:]:
            assert torch.equal(other[name][0], x) and other[name][1] == y
    tkw = dict(train=True, batch_size=16, crop_size=32, seed=9, threads=2)
    a = batches(DaliLoader(open_source(synth_root).split("train"), **tkw))
    b = batches(DaliLoader(open_source(packed).split("train"), **tkw))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_train_order_is_the_plain_loaders(synth_root):
    split = open_source(synth_root).split("train")
    loader = DaliLoader(split, train=True, batch_size=16, crop_size=24, seed=7, threads=1)
    ys = torch.cat([y for _, y in loader])
    order = list(EpochSampler(range(len(split)), seed=7))
    assert len(ys) == len(split) // 16 * 16 and len(loader) == len(split) // 16
    assert ys.tolist() == split.labels[order[:len(ys)]].tolist()
    plain = build_loader(split, train=True, batch_size=16, crop_size=24, workers=0, seed=7)
    assert torch.equal(torch.cat([y for _, y in plain]), ys)


def _identity_set(root, n=80, seed=0):
    """n constant images, image i of value 3 i (so crop, resize and flip keep it), random
    sizes, two classes: the output tells which image it came from."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / ("even" if i % 2 == 0 else "odd")
        d.mkdir(parents=True, exist_ok=True)
        shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        Image.fromarray(np.full(shape, 3 * i, np.uint8)).save(d / f"{i:03d}.png")
    return open_source(root).split("train")


def _which(x, split):
    """Image index of each output (constant value 3 i)."""
    value = grey_levels(x.flatten(1).mean(1)).round().long()
    names = {int(Path(f).stem): k for k, f in enumerate(split.files)}
    return [names[int(v) // 3] for v in value]


@pytest.mark.parametrize("train", [True, False])
def test_two_shards_cover_the_data_set_exactly_once_per_epoch(tmp_path, train):
    split = _identity_set(tmp_path)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            loader = DaliLoader(split, train=train, batch_size=8, crop_size=16, resize_size=18,
                                seed=4, rank=rank, world_size=2, threads=1)
            loader.set_epoch(epoch)
            for x, y in loader:
                assert x.shape[1:] == (1, 16, 16) and x.std(dim=(1, 2, 3)).max() < 1e-5
                idx = _which(x, split)
                assert torch.equal(y, torch.from_numpy(split.labels[idx]))
                seen += idx
        assert sorted(seen) == list(range(80))


def test_shards_come_from_the_torchrun_environment(synth_root, monkeypatch):
    split = open_source(synth_root).split("val")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for backend in ("dali", "torch"):
        loader = make_loader(split, train=False, batch_size=8, crop_size=16, resize_size=18,
                             workers=0, backend=backend, log=quiet)
        ys = torch.cat([y for _, y in loader])
        assert ys.tolist() == split.labels[1::2].tolist(), backend


def test_epochs_are_reproducible_resumable_and_differ(synth_root):
    """Epoch e is a function of (seed, rank, e): a fresh loader set to epoch 1 reproduces the
    second epoch of a loader that ran epoch 0, also when that epoch was abandoned after one
    batch; without set_epoch the next pass is the next epoch."""
    split = open_source(synth_root).split("train")
    kw = dict(train=True, batch_size=16, crop_size=24, seed=5, threads=2)
    a = DaliLoader(split, **kw)
    e0 = batches(a)
    e1 = batches(a)  # no set_epoch: epoch 1
    b = DaliLoader(split, **kw)
    b.set_epoch(1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches(b), e1))
    assert not torch.equal(e0[0][0], e1[0][0])
    c = DaliLoader(split, **kw)
    it = iter(c)
    next(it)  # abandon epoch 0 after one batch (its prefetched batches are dropped)
    del it
    c.set_epoch(1)
    again = batches(c)
    assert len(again) == len(e1) and all(torch.equal(x, y) for (x, _), (y, _) in zip(again, e1))
    d = DaliLoader(split, **dict(kw, seed=6))
    assert not torch.equal(batches(d)[0][0], e0[0][0])


def test_output_forms_and_static_buffers(synth_root):
    split = open_source(synth_root).split("val")
    kw = dict(train=False, batch_size=16, crop_size=24, resize_size=27, threads=2)
    ref = batches(DaliLoader(split, **kw))
    forms = [dict(channels=3), dict(channels_last=True), dict(channels=3, channels_last=True),
             dict(dtype=torch.bfloat16), dict(static=True)]
    for form in forms:
        loader = DaliLoader(split, **kw, **form)
        ptrs = set()
        for (x, y), (xr, yr) in zip(loader, ref):
            ptrs.add(x.data_ptr())
            assert x.shape == (len(y), form.get("channels", 1), 24, 24)
            assert x.dtype == form.get("dtype", torch.float32) and torch.equal(y, yr)
            if form.get("channels_last"):
                assert x.is_contiguous(memory_format=torch.channels_last)
            tol = 2 ** -7 * xr.abs().max().item() if x.dtype == torch.bfloat16 else 0
            for c in range(x.shape[1]):
                assert torch.allclose(x[:, c].float(), xr[:, 0], rtol=0, atol=tol)
        assert (len(ptrs) == 1) == bool(form.get("static"))
        if form.get("static"):
            assert loader.buffers[0].data_ptr() in ptrs


def test_batches_kept_by_the_consumer_stay_valid(synth_root):
    """Without static buffers the batches are DALI's own outputs (no copy): keeping them all
    must not let later batches overwrite earlier ones."""
    split = open_source(synth_root).split("train")
    kw = dict(train=True, batch_size=16, crop_size=24, seed=1, threads=2)
    kept = list(DaliLoader(split, **kw))  # references only
    copied = batches(DaliLoader(split, **kw))
    assert len(kept) == len(copied) == len(split) // 16
    assert len({x.data_ptr() for x, _ in kept}) == len(kept)
    assert all(torch.equal(a, c) and torch.equal(y, yc) for (a, y), (c, yc) in zip(kept, copied))


# ----------------------------------------------------------------------------- bad files
def _broken_stream(path: Path):
    """Flip a byte inside the IDAT payload and fix the CRC: passes the scan, fails to decode."""
    import struct
    import zlib
    data = bytearray(path.read_bytes())
    pos = 8
    while True:
        length, ctype = struct.unpack(">I4s", bytes(data[pos:pos + 8]))
        if ctype == b"IDAT":
            data[pos + 8 + 5] ^= 0xFF
            crc = zlib.crc32(bytes(data[pos + 8:pos + 8 + length]), zlib.crc32(b"IDAT"))
            data[pos + 8 + length:pos + 12 + length] = struct.pack(">I", crc)
            break
        pos += 12 + length
    path.write_bytes(bytes(data))


def test_bad_files_are_named_before_the_epoch_or_when_they_fail(synth_copy):
    split = open_source(synth_copy).split("val")
    bad = Path(split.files[30])
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: found by the scan, no batch made
    with pytest.raises(DataError, match="truncated PNG") as e:
        DaliLoader(split, train=False, batch_size=8, crop_size=16, resize_size=18)
    assert str(bad) in str(e.value)
    logs = []
    loader = make_loader(split, train=False, batch_size=8, crop_size=16, resize_size=18,
                         backend="dali", on_bad_image="skip", log=logs.append)
    assert isinstance(loader, DaliLoader) and sum(len(y) for _, y in loader) == len(split) - 1
    assert "skipped 1 bad file" in logs[-1]
    # intact chunks, broken zlib stream: the check decodes the image data, so it is found before
    # the epoch too (named with the default, left out and counted with skip)
    _broken_stream(Path(split.files[12]))
    with pytest.raises(DataError) as e:
        make_loader(split, train=False, batch_size=8, crop_size=16, resize_size=18, backend="dali",
                    log=quiet)
    assert split.files[12] in str(e.value) or split.files[30] in str(e.value)
    logs = []
    loader = make_loader(split, train=False, batch_size=8, crop_size=16, resize_size=18,
                         backend="dali", on_bad_image="skip", log=logs.append)
    assert sum(len(y) for _, y in loader) == len(split) - 2
    assert "skipped 2 bad file" in logs[-1] and "broken compressed image data" in logs[-1]


def test_files_dali_cannot_decode_like_pil_are_converted_first(tmp_path):
    """16-bit, RGB, palette and JPEG files go through load_grey: DALI then sees the same grey
    pixels as the plain loader (eval outputs equal to an 8-bit grey PNG of load_grey)."""
    rng = np.random.default_rng(12)
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    def colour():
        return Image.fromarray(rng.integers(0, 256, (30, 26, 3), np.uint8))

    files = {"deep.png": Image.fromarray(rng.integers(0, 65535, (30, 26)).astype(np.uint16)),
             "rgb.png": colour(), "palette.png": colour().convert("P"), "photo.jpg": colour()}
    for name, im in files.items():
        im.save(d / name)
    split = open_source(tmp_path).split("train")
    grey = tmp_path / "grey" / "train" / "x"
    grey.mkdir(parents=True)
    for f in split.files:
        load_grey(f).save(grey / (Path(f).stem + ".png"))
    want = open_source(tmp_path / "grey").split("train")
    kw = dict(train=False, batch_size=4, crop_size=24, resize_size=26)
    x = next(iter(DaliLoader(split, **kw)))[0]
    order = [[Path(f).stem for f in want.files].index(Path(f).stem) for f in split.files]
    assert torch.equal(x, next(iter(DaliLoader(want, **kw)))[0][order])


# ----------------------------------------------------------------------------- the trainer
def test_train_runs_through_dali_from_a_root_and_a_cache(synth_root, packed, tmp_path,
                                                         monkeypatch):
    plans = []
    real = DaliLoader.plan_epoch
    monkeypatch.setattr(DaliLoader, "plan_epoch",
                        lambda self: plans.append(self.train) or real(self))
    for name, data in (("root", synth_root), ("cache", packed)):
        out = tmp_path / name
        r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(data), "--out",
                                      str(out), "--epochs", "1", "-b", "32",
                                      "--train-crop-size", "16", "--val-resize-size", "18",
                                      "--val-crop-size", "16", "-j", "1", "--loader", "dali"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert (out / "best.pt").exists()
    assert plans == [True, False, True, False]  # one train and one val epoch each, via DALI


# ----------------------------------------------------------------------------- GPU variant
@gpu
@needs_cuda
@pytest.mark.parametrize("train", [True, False])
def test_gpu_variant_matches_the_cpu_variant(synth_root, packed, train):
    """Same plan, device placement only: the GPU pipeline's images equal the CPU one's within
    1 grey level (float rounding in the resize), labels identical, on the CUDA device."""
    for root in (synth_root, packed):
        split = open_source(root).split("train" if train else "val")
        kw = dict(train=train, batch_size=16, crop_size=32, resize_size=36, seed=2, threads=2)
        cpu = batches(DaliLoader(split, **kw))
        dev = batches(DaliLoader(split, **kw, device="cuda"))
        assert len(cpu) == len(dev)
        for (xc, yc), (xg, yg) in zip(cpu, dev):
            assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
            assert (grey_levels(xg.cpu()) - grey_levels(xc)).abs().max() <= 1.0 + 1e-3


@gpu
@needs_cuda
def test_gpu_static_buffers_bf16_channels_last(packed):
    split = open_source(packed).split("train")
    loader = DaliLoader(split, train=True, batch_size=16, crop_size=32, device="cuda",
                        dtype=torch.bfloat16, channels_last=True, static=True, channels=3)
    ptrs = {x.data_ptr() for x, _ in loader}
    x, y = loader.buffers
    assert len(ptrs) == 1 and x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x[:, 0], x[:, 2])
