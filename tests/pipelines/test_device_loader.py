"""``--loader device`` on the CPU: crop and flip statistics, pixels against the plain loader,
eval, shards, reproducibility, output forms, refusals, and a resumed run through the CLI."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import pgnm_fast.pipelines.device as devmod
from pgnm_fast.errors import ConfigError, DataError
from pgnm_fast.pipelines import open_source
from pgnm_fast.pipelines.factory import _device_or, make_loader
from pgnm_fast.pipelines.loader import build_cached_loader
from pgnm_fast.pipelines.pack import PARTIAL, pack
from pgnm_fast.pipelines.transforms import STD, RandomResizedCrop, grey_of, to_tensor

LEVEL = 1 / 255 / STD  # one grey level after normalisation


def quiet(*_):
    pass


def _write_set(root, rng, colour_every=0, n_per=(14, 5)):
    """Class folders of PNGs of random sizes (15..70 px a side); every ``colour_every``-th
    image RGB."""
    k = 0
    for split, n in zip(("train", "val"), n_per):
        for cls in ("a", "b", "c"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(15, 70, 2)
                k += 1
                if colour_every and k % colour_every == 0:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                        d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(
                        d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A grey cache of images of different sizes (some stored RGB, converted by the packer)."""
    tmp = tmp_path_factory.mktemp("devloader")
    src = _write_set(tmp / "src", np.random.default_rng(7), colour_every=5)
    pack(src, tmp / "cache", workers=0, log=quiet)
    return tmp / "cache"


@pytest.fixture(scope="module")
def rgb_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devloader_rgb")
    src = _write_set(tmp / "src", np.random.default_rng(8), colour_every=1, n_per=(6, 3))
    pack(src, tmp / "cache", workers=0, log=quiet)
    return tmp / "cache"


def split_of(root, name="train"):
    return open_source(root).split(name)


def loader(root, name="train", **kw):
    kw = dict(dict(train=name == "train", batch_size=8, crop_size=24, resize_size=28), **kw)
    return devmod.DeviceLoader(split_of(root, name), **kw)


def batches(ld):
    return [(x.clone(), y.clone()) for x, y in ld]


def _grey_image(split, i):
    a = split.cache.image(int(split.records[i]))
    return Image.fromarray(a[:, :, 0]) if a.shape[2] == 1 else Image.fromarray(a).convert("L")


# ----------------------------------------------------------------------------- statistics
def _repeated(root, n):
    """A train split whose every sample is the same 60 x 40-ish record (a large sample of
    crops of one image shape)."""
    s = split_of(root)
    big = int(np.argmax(s.heights * s.widths))
    return dataclasses.replace(s, files=[s.files[big]] * n, labels=np.zeros(n, np.int64),
                               records=np.full(n, s.records[big]))


def test_crop_area_and_aspect_follow_torchvisions_rules(cache):
    """Two-sample KS tests of the crop's area fraction and log aspect ratio against the plain
    loader's torchvision ``get_params`` (4000 each: at alpha = 1e-3 the critical distance is
    0.044, so a shift of the distributions by 0.07 in KS distance, e.g. scale (0.08, 0.9)
    instead of (0.08, 1), is caught with power > 0.99); the plan's boxes lie in the image."""
    from scipy.stats import ks_2samp
    n = 4000
    ld = devmod.DeviceLoader(_repeated(cache, n), train=True, batch_size=8, crop_size=24, seed=1)
    plan = ld.plan_epoch()
    top, left, h, w = plan["box"].T.numpy()
    H, W = int(ld.height[0]), int(ld.width[0])
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    g = torch.Generator().manual_seed(2)
    img = Image.new("L", (W, H))
    ref = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3), g)
                    for _ in range(n)])
    assert ks_2samp(h * w / (H * W), ref[:, 2] * ref[:, 3] / (H * W)).pvalue > 1e-3
    assert ks_2samp(np.log(w / h), np.log(ref[:, 3] / ref[:, 2])).pvalue > 1e-3


def test_flip_rate_is_one_half_and_flips_mirror_the_pixels(cache):
    """Binomial: 4000 draws, |rate - 0.5| < 4 sd (0.032); a rate of 0.45 fails with
    probability > 0.9, 0.4 with probability ~1. A flipped sample is the mirror image of the
    same crop unflipped."""
    ld = devmod.DeviceLoader(_repeated(cache, 4000), train=True, batch_size=8, crop_size=24)
    plan = ld.plan_epoch()
    rate = plan["flip"].double().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / 4000)
    i = int(plan["flip"].nonzero()[0])
    flipped = ld.batch(plan, i, 1)[0].clone()
    plan["flip"][i] = False
    plain = ld.batch(plan, i, 1)[0]
    assert torch.equal(flipped, plain.flip(-1))


# ----------------------------------------------------------------------------- pixels
def _pil_reference(img, box, size, flip):
    top, left, h, w = box
    crop = img.crop((left, top, left + w, top + h))
    two = crop.resize((size, h), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    direct = crop.resize((size, size), Image.BILINEAR)  # what the plain loader's PIL does
    if flip:
        two, direct = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (two, direct))
    return to_tensor(two), to_tensor(direct)


@pytest.mark.parametrize("channels,impl", [(1, "torch"), (3, "torch"), (1, "auto"), (3, "auto")])
def test_train_pixels_equal_the_plain_loaders_for_the_same_boxes(cache, channels, impl):
    """Every image of an epoch against PIL given the plan's box and flip: the exact path
    (``impl="torch"``, the Triton kernel's math) equals Pillow's horizontal-then-vertical passes;
    it and the CPU's default (torch's uint8 resize) are within 1 grey level of the installed
    Pillow's ``resize`` (the plain loader's transform), the default also of the two passes."""
    ld = loader(cache, channels=channels, seed=4, impl=impl)
    s = ld.split
    plan = ld.plan_epoch()
    for start in range(0, len(plan["slot"]), ld.batch_size):
        x, y = ld.batch(plan, start, ld.batch_size)
        for j in range(len(y)):
            i = start + j
            idx = int(ld.held[int(plan["slot"][i])])
            two, direct = _pil_reference(_grey_image(s, idx), plan["box"][i].tolist(), 24,
                                         bool(plan["flip"][i]))
            assert int(y[j]) == int(s.labels[idx])
            for c in range(channels):
                if impl == "torch":
                    assert torch.equal(x[j, c], two[0])
                assert (x[j, c] - two[0]).abs().max() <= LEVEL * 1.0001
                assert (x[j, c] - direct[0]).abs().max() <= LEVEL * 1.0001


def test_eval_equals_the_plain_loader_within_one_level(cache):
    """Eval (shorter side to 28, centre crop 24; images from 15 px up, so both padding and
    shrinking occur) against the plain loader over the same cache."""
    dev = batches(loader(cache, "val"))
    plain = list(build_cached_loader(split_of(cache, "val"), train=False, batch_size=8,
                                     crop_size=24, resize_size=28, workers=0))
    assert len(dev) == len(plain)
    same = total = 0
    for (x, y), (xr, yr) in zip(dev, plain):
        assert torch.equal(y, yr) and x.shape == xr.shape
        assert (x - xr).abs().max() <= LEVEL * 1.0001
        same, total = same + int((x == xr).sum()), total + x.numel()
    assert same >= 0.75 * total


def test_an_rgb_cache_is_read_as_pils_grey(rgb_cache):
    s = split_of(rgb_cache, "val")
    assert s.cache.channels == 3
    for i in range(len(s)):
        a = s.cache.image(int(s.records[i]))
        assert np.array_equal(grey_of(a), np.asarray(Image.fromarray(a).convert("L")))
    dev = batches(loader(rgb_cache, "val"))
    plain = list(build_cached_loader(s, train=False, batch_size=8, crop_size=24, resize_size=28,
                                     workers=0))
    for (x, _), (xr, _) in zip(dev, plain):
        assert (x - xr).abs().max() <= LEVEL * 1.0001


# ----------------------------------------------------------------------------- order
@pytest.mark.parametrize("train", [True, False])
def test_shards_hold_only_their_images_and_cover_each_once_per_epoch(cache, train):
    name = "train" if train else "val"
    s = split_of(cache, name)
    seen = []
    for rank in range(3):
        ld = loader(cache, name, rank=rank, world_size=3, batch_size=4)
        held = np.arange(rank, len(s), 3)
        assert ld.nbytes == int((s.heights[held] * s.widths[held]).sum())
        order = np.fromiter(iter(ld.sampler), np.int64)
        assert set(order) == set(held)
        seen.append(order)
    every = np.concatenate(seen)
    assert sorted(set(every)) == list(range(len(s)))
    # padding as DistributedSampler pads: at most world_size - 1 repeats in all
    assert len(every) - len(s) < 3 and (train or len(every) == len(s))


def test_one_process_holds_the_plain_loaders_order(cache):
    ld = loader(cache)
    plain = build_cached_loader(split_of(cache), train=True, batch_size=8, crop_size=24,
                                workers=0)
    for epoch in (0, 3):
        ld.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        # the plain loader's train sampler yields (index, augmentation seed) pairs
        assert list(ld.sampler) == [i for i, _ in plain.sampler]


def test_epochs_are_pure_functions_of_seed_rank_and_epoch(cache):
    a = loader(cache, seed=5)
    e0, e1 = batches(a), batches(a)  # no set_epoch: the second pass is epoch 1
    b = loader(cache, seed=5)
    b.set_epoch(1)
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(batches(b), e1))
    assert not torch.equal(e0[0][0], e1[0][0])
    assert not torch.equal(batches(loader(cache, seed=6))[0][0], e0[0][0])
    r1 = loader(cache, seed=5, rank=1, world_size=2)
    assert not torch.equal(batches(r1)[0][0], e0[0][0])


# ----------------------------------------------------------------------------- forms
def test_output_forms_and_static_buffers(cache):
    ref = batches(loader(cache))
    for form in (dict(channels=3), dict(channels_last=True), dict(dtype=torch.bfloat16),
                 dict(static=True)):
        ld = loader(cache, **form)
        ptrs = set()
        for (x, y), (xr, yr) in zip(ld, ref):
            ptrs.add(x.data_ptr())
            assert x.shape == (8, form.get("channels", 1), 24, 24) and torch.equal(y, yr)
            assert x.dtype == form.get("dtype", torch.float32)
            if form.get("channels_last"):
                assert x.is_contiguous(memory_format=torch.channels_last)
            for c in range(x.shape[1]):
                assert torch.equal(x[:, c], xr[:, 0].to(x.dtype))
        assert (len(ptrs) == 1) == bool(form.get("static"))
        if form.get("static"):
            assert ld.buffers[0].data_ptr() in ptrs


# ----------------------------------------------------------------------------- fill in the step
class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads device data to the host or whose output shape depends on
    the data (``.item()``, ``nonzero``, boolean indexing, ``equal``, ...): the ops a CUDA graph
    cannot hold and that stall the GPU."""

    BANNED = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                    torch.ops.aten.item.default) or any(t in func.tags for t in self.BANNED):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def _deferred(root, **kw):
    ld = loader(root, static=True, **kw)
    assert ld.defer_fill() == ld.fill and ld.prologue == ld.fill
    return ld


def test_counter_driven_fill_equals_the_eager_batches(cache):
    """Two epochs: every batch that ``fill`` writes, picked by the device-side counter, equals
    the eager ``batch(plan, start, n)`` of the same (seed, epoch), bit for bit; the iterator
    yields the static buffers unfilled; the plan tensors keep their storage across epochs."""
    eager = loader(cache, seed=9)
    ld = _deferred(cache, seed=9)
    ptrs = set()
    for epoch in range(2):
        ref = batches(eager)
        n = 0
        for (x, y), (xr, yr) in zip(ld, ref):
            assert (x, y) == ld.buffers
            x.fill_(float("nan"))
            ld.fill()
            assert torch.equal(x, xr) and torch.equal(y, yr), (epoch, n)
            n += 1
        assert n == len(ref) == len(ld) and int(ld._step) == n
        ptrs.add(tuple(v.data_ptr() for v in ld._plan.values()))
    assert len(ptrs) == 1


def test_the_fill_does_no_host_synchronisation(cache):
    """The fill's whole path (counter, plan rows, taps, labels) under a guard that fails on any
    host read of device data, with the Triton kernel (interpreted on the CPU); the guard
    catches the CPU-only torch resampling, which reads its tap count to the host."""
    ld = _deferred(cache, impl="triton", batch_size=4)
    ref = batches(loader(cache, batch_size=4, impl="torch"))
    it = iter(ld)
    for i in range(2):
        x, y = next(it)
        with NoHostSync():
            ld.fill()
        assert torch.equal(x, ref[i][0]) and torch.equal(y, ref[i][1])
    ld.impl = "torch"
    next(it)
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        ld.fill()


def test_graphed_step_runs_the_fill_inside_the_captured_function(cache):
    """GraphedStep with the fill as its prologue, through a capture that records the function
    (running nothing) and replays it: the fill runs in the warm-up steps and in every replay,
    never at capture, and a whole epoch steps over the same batches as the eager loader."""
    from pgnm_fast.engine import N_STATS
    from pgnm_fast.graphs import GraphedStep

    state = {"replaying": False}
    fills = []

    def capture(fn):
        def replay():
            state["replaying"] = True
            fn()
            state["replaying"] = False
        return replay

    ld = _deferred(cache, seed=2)
    fill = ld.prologue

    def prologue():
        fills.append(state["replaying"])
        fill()

    seen = []

    def step(images, target, stats):
        seen.append((images.clone(), target.clone()))
        stats[4] += target.shape[0]

    runner = GraphedStep(step, [], warmup=2, static_inputs=True, prologue=prologue,
                         log=quiet, capture=capture, warm=lambda fn: fn())
    stats = torch.zeros(N_STATS)
    for epoch in range(2):
        ld.set_epoch(epoch)
        for images, target in ld:
            runner(images, target, stats)
        eager = loader(cache, seed=2)
        eager.set_epoch(epoch)
        ref = batches(eager)
        got, seen[:] = list(seen), []
        assert len(got) == len(ref)
        assert all(torch.equal(x, xr) and torch.equal(y, yr) for (x, y), (xr, yr) in zip(got, ref))
    steps = 2 * len(ld)
    assert runner.captures == 1 and stats[4] == steps * ld.batch_size
    assert fills == [False, False] + [True] * (steps - 2)
    with pytest.raises(RuntimeError, match="prologue fills the static buffers"):
        runner(images.clone(), target, stats)


def test_the_trainer_defers_the_fill_only_when_the_step_is_graphed(cache):
    import types

    import pgnm_fast.stages as stages
    from pgnm_fast.graphs import GraphedStep
    from pgnm_fast.speed import ExecutionPlan, plan_execution
    parts = types.SimpleNamespace(step=lambda *a: None, optimizer=None, policy_optimizer=None)
    ld = loader(cache, static=True)
    on_cpu = plan_execution(types.SimpleNamespace(graphs=True, channels_last=None), torch.device("cpu"))
    assert stages._graphed(parts, ld, on_cpu, quiet) is parts.step and ld.prologue is None
    graphed = ExecutionPlan(graphs=True, static_buffers=True)  # as planned on a single GPU
    said = []
    runner = stages._graphed(parts, ld, graphed, said.append)
    assert isinstance(runner, GraphedStep) and runner.prologue == ld.fill == ld.prologue
    assert "augmentation captured" in said[0]
    plain = loader(cache)  # not static: filled by the iterator, no prologue
    no_buffers = ExecutionPlan(graphs=True, static_buffers=False)
    assert stages._graphed(parts, plain, no_buffers, quiet).prologue is None and plain.prologue is None
    with pytest.raises(ValueError, match="static train loader"):
        loader(cache, "val", static=True).defer_fill()


# ----------------------------------------------------------------------------- the factory
def test_make_loader_device_on_the_cpu_and_its_refusals(cache, tmp_path):
    ld = make_loader(cache, train=True, batch_size=8, crop_size=24, backend="device", log=quiet)
    assert isinstance(ld, devmod.DeviceLoader) and len(ld) == len(split_of(cache)) // 8
    files = tmp_path / "files"
    _write_set(files, np.random.default_rng(1), n_per=(3, 1))
    with pytest.raises(ConfigError, match="--loader device reads a packed cache"):
        make_loader(files, train=True, batch_size=2, backend="device", log=quiet)
    partial = tmp_path / "partial"
    (partial / PARTIAL).mkdir(parents=True)
    with pytest.raises(DataError, match="interrupted pack"):
        make_loader(partial, train=True, batch_size=2, backend="device", log=quiet)


def test_a_cache_too_large_for_the_device_stops_or_falls_back(cache, monkeypatch):
    """Both sizes in one line; explicit ``device`` stops, ``auto`` falls back and says so."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * gib, 40 * gib))
    s = split_of(cache)
    args = (s, True, True, "cuda:0", 0, 1)
    with pytest.raises(ConfigError) as e:
        _device_or("device", *args, log=quiet)
    line = str(e.value)
    assert "\n" not in line and "7.00 GiB free" in line and "8.0 GiB margin" in line
    assert f"cache {devmod.grey_bytes(s) / gib:.2f} GiB" in line
    logs = []
    assert _device_or("auto", *args, log=logs.append) in ("dali", "torch")
    assert any("does not fit in device memory" in m for m in logs)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * gib, 80 * gib))
    logs.clear()
    assert _device_or("auto", *args, log=logs.append) == "device"
    assert any("resident in device memory" in m for m in logs)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_resumed_run_through_the_device_loader_is_bit_identical(cache, tmp_path,
                                                                ctrl_c_in_epoch):
    from click.testing import CliRunner

    from pgnm_fast.cli import main
    from pgnm_fast.run_state import load_checkpoint

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    common = ["--data", cache, "--loader", "device", "--grid", "8", "--impl", "fast",
              "--epochs", "2", "-b", "8", "--train-crop-size", "24", "--val-resize-size", "28",
              "--val-crop-size", "24", "-j", "0", "--print-freq", "2", "--seed", "3"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    r = cli("train", "--out", whole, *common)
    assert r.exit_code == 0, r.output
    assert "through the cache resident on cpu" in r.output
    disarm = ctrl_c_in_epoch(1)
    assert cli("train", "--out", part, *common).exit_code != 0
    disarm()
    assert load_checkpoint(part / "last.pt")["epoch"] == 0
    r = cli("train", "--resume", part / "last.pt")
    assert r.exit_code == 0, r.output
    resumed, full = load_checkpoint(part / "last.pt"), load_checkpoint(whole / "last.pt")
    assert resumed["epoch"] == 1 and resumed["step"] == full["step"]
    for key in full["model"]:
        assert torch.equal(resumed["model"][key], full["model"][key]), key
    assert torch.equal(resumed["policy"]["base_alpha"], full["policy"]["base_alpha"])


def test_an_unknown_impl_is_refused(cache):
    with pytest.raises(ValueError, match="impl must be one of"):
        loader(cache, impl="pil")
