"""MedMNIST .npz files: the layout, its splits and classes, grey conversion, every loader, the
one-line errors, and a tiny training run through the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist_files import write_medmnist
from PIL import Image

from pgnm_fast.errors import ConfigError, DataError
from pgnm_fast.pipelines import make_loader, open_source
from pgnm_fast.pipelines.dali import dali_available

ROOT = Path(__file__).resolve().parents[2]


def quiet(*_):
    pass


def test_the_files_splits_labels_and_pixels(medmnist_npz):
    source = open_source(medmnist_npz)
    assert source.layout == "medmnist" and source.splits == ["train", "val", "test"]
    assert source.classes == ["class_0", "class_1", "class_2", "class_3"]
    with np.load(medmnist_npz) as z:
        for name in ("train", "val", "test"):
            split = source.split(name)
            assert np.array_equal(split.labels, z[f"{name}_labels"][:, 0])
            assert len(set(split.files)) == len(split) == len(z[f"{name}_images"])
            assert np.array_equal(np.asarray(split.grey(3)), z[f"{name}_images"][3])


def test_class_names_from_the_file(tmp_path):
    names = np.array(["adipose", "background", "debris", "lymphocytes"])
    path = write_medmnist(tmp_path / "named.npz", label=names)
    assert open_source(path).classes == list(names)


def test_a_folder_with_one_file_is_read_and_with_several_refused(tmp_path):
    (tmp_path / "one").mkdir()
    write_medmnist(tmp_path / "one" / "pathmnist.npz")
    assert open_source(tmp_path / "one").layout == "medmnist"
    (tmp_path / "two").mkdir()
    for name in ("pathmnist.npz", "pathmnist_64.npz"):
        write_medmnist(tmp_path / "two" / name)
    with pytest.raises(DataError, match=r"holds 2 \.npz files \(pathmnist\.npz, pathmnist_64\.npz\)"):
        open_source(tmp_path / "two")


def test_rgb_becomes_grey_by_the_png_rule_unless_three_channels(tmp_path):
    path = write_medmnist(tmp_path / "rgb.npz", rgb=True, size=28)
    split = open_source(path).split("train")
    with np.load(path) as z:
        rgb = z["train_images"][5]
    assert np.array_equal(np.asarray(split.grey(5)), np.asarray(Image.fromarray(rgb).convert("L")))
    grey = make_loader(split, train=False, batch_size=4, crop_size=28, resize_size=28, workers=0,
                       backend="torch", log=quiet)
    colour = make_loader(split, train=False, batch_size=4, crop_size=28, resize_size=28,
                         channels=3, workers=0, backend="torch", log=quiet)
    g, c = next(iter(grey))[0], next(iter(colour))[0]
    assert g.shape == (4, 1, 28, 28) and c.shape == (4, 3, 28, 28)
    assert not np.allclose(c[:, 0], c[:, 1])  # the file's own channels, not copies of grey
    told = []
    auto = make_loader(split, train=True, batch_size=4, crop_size=24, channels=3, workers=0,
                       log=told.append)
    assert type(auto).__name__ == "PlainLoader" and any("plain PyTorch loader" in t for t in told)
    with pytest.raises(ConfigError, match="--loader device reads train images grey only"):
        make_loader(split, train=True, batch_size=4, crop_size=24, channels=3, backend="device")


@pytest.mark.parametrize("backend", ["torch", "device", "dali"])
def test_every_loader_reads_the_file(medmnist_npz, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    loader = make_loader(medmnist_npz, train=True, batch_size=8, crop_size=24, resize_size=28,
                         backend=backend, workers=0, log=quiet)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 24, 24) and set(labels.tolist()) <= {0, 1, 2, 3}


def _bad(tmp_path, **override):
    return write_medmnist(tmp_path / "bad.npz", **override)


BAD = {
    "missing key": (dict(val_labels=None), "no key 'val_labels'"),
    "multi-label": (dict(train_labels=np.zeros((40, 14), np.uint8)),
                    r"train_labels has shape \(40, 14\): multi-label tasks .* not supported"),
    "label rank": (dict(test_labels=np.zeros((12, 1, 1), np.uint8)),
                   r"test_labels has shape \(12, 1, 1\), expected \(12,\) or \(12, 1\)"),
    "label count": (dict(val_labels=np.zeros((11, 1), np.uint8)),
                    r"val_labels has shape \(11, 1\), expected \(12,\)"),
    "no images": (dict(test_images=np.zeros((0, 28, 28), np.uint8),
                       test_labels=np.zeros((0, 1), np.uint8)), "test_images holds no images"),
    "negative": (dict(val_labels=np.full((12, 1), -1, np.int64)),
                 r"val_labels holds a negative label \(-1\)"),
    "out of range": (dict(val_labels=np.full((12, 1), 7, np.int64)),
                     "val_labels holds label 7, outside the 4 classes"),
    "outside the names": (dict(label=np.array(["a", "b", "c"])),
                          "train_labels holds label 3, outside the 3 classes of label"),
    "float labels": (dict(train_labels=np.zeros((40, 1), np.float32)),
                     "train_labels is float32, expected integer"),
    "float images": (dict(train_images=np.zeros((40, 28, 28), np.float32)),
                     "train_images is float32, expected uint8"),
    "image rank": (dict(val_images=np.zeros((12, 784), np.uint8)),
                   r"val_images has shape \(12, 784\), expected \(N, H, W\)"),
    "four channels": (dict(val_images=np.zeros((12, 28, 28, 4), np.uint8)),
                      r"val_images has shape \(12, 28, 28, 4\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_file_and_key(tmp_path, case):
    override, message = BAD[case]
    path = _bad(tmp_path, **override)
    with pytest.raises(DataError, match=message) as e:
        open_source(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_not_an_npz_is_one_line(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz file"):
        open_source(path)


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pgnm_fast", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_train_on_an_npz_through_the_cli(medmnist_npz, tmp_path):
    out = tmp_path / "run"
    p = _cli("train", "--data", medmnist_npz, "--out", out, "--epochs", "1", "-b", "8",
             "--train-crop-size", "24", "--val-resize-size", "28", "--val-crop-size", "24",
             "--grid", "8", "-j", "0", "--impl", "reference", "--loader", "torch")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "40 train / 12 val images" in p.stdout and (out / "best.pt").is_file()


def test_a_bad_file_stops_the_cli_with_one_error_line(tmp_path):
    path = _bad(tmp_path, train_labels=np.zeros((40, 14), np.uint8))
    p = _cli("train", "--data", path, "--out", tmp_path / "run", "--epochs", "1")
    assert p.returncode != 0
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: train_labels"), lines
    assert not (tmp_path / "run").exists()


def test_pack_an_npz_and_read_the_same_batches(medmnist_npz, tmp_path):
    from pgnm_fast.pipelines.pack import pack, verify
    manifest = pack(medmnist_npz, tmp_path / "cache", log=quiet)
    assert manifest["channels"] == 1 and manifest["splits"] == {"train": 40, "val": 12, "test": 12}
    verify(tmp_path / "cache", log=quiet)
    cache, source = open_source(tmp_path / "cache"), open_source(medmnist_npz)
    assert cache.classes == source.classes
    for name in ("train", "val", "test"):
        a, b = cache.split(name), source.split(name)
        assert a.files == b.files and np.array_equal(a.labels, b.labels)
        assert np.array_equal(np.asarray(a.grey(7)), np.asarray(b.grey(7)))
    kw = dict(train=True, batch_size=8, crop_size=24, backend="torch", workers=0, seed=3,
              log=quiet)
    for (x, y), (u, v) in zip(make_loader(cache.split("train"), **kw),
                              make_loader(source.split("train"), **kw)):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_pack_an_rgb_npz_grey_or_in_colour(tmp_path):
    from pgnm_fast.pipelines.pack import pack
    path = write_medmnist(tmp_path / "rgb.npz", rgb=True)
    assert pack(path, tmp_path / "rgb", log=quiet)["channels"] == 3
    assert pack(path, tmp_path / "grey", channels="grey", log=quiet)["channels"] == 1
    with np.load(path) as z:
        want = np.asarray(Image.fromarray(z["val_images"][2]).convert("L"))
    split = open_source(tmp_path / "grey").split("val")
    assert np.array_equal(split.cache.image(split.records[2])[:, :, 0], want)
    split = open_source(tmp_path / "rgb").split("val")
    assert np.array_equal(np.asarray(split.grey(2)), want)
