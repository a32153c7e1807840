"""The synthetic data generator: determinism, classes, patient-disjoint splits, both layouts,
learnability, and the default-data cache."""
import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from sklearn.neighbors import NearestCentroid

from pgnm_fast import synth
from pgnm_fast.errors import ConfigError, DataError
from pgnm_fast.pipelines import open_source

PATIENT = re.compile(r"-p(\d+)-\d+\.png$")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _csv_rows(root, split):
    with open(root / f"RadiologyAI_{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = _files(synth.make_synthetic(tmp_path / "a", images=78, seed=5, size=32))
    b = _files(synth.make_synthetic(tmp_path / "b", images=78, seed=5, size=32))
    c = _files(synth.make_synthetic(tmp_path / "c", images=78, seed=6, size=32))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 78
    digests_a = {hashlib.sha256(a[k]).digest() for k in pngs}
    digests_c = {hashlib.sha256(v).digest() for k, v in c.items() if k.endswith(".png")}
    assert len(digests_a & digests_c) == 0  # no image of seed 5 reappears under seed 6


def test_classes_splits_and_patients(synth_root):
    classes = {}
    patients = {}
    for split in ("train", "val", "test"):
        rows = _csv_rows(synth_root, split)
        names = ["__".join(r["filename"].split("/")[1:-1]) for r in rows]
        classes[split] = set(names)
        patients[split] = {int(PATIENT.search(r["filename"]).group(1)) for r in rows}
        for r in rows:
            assert (synth_root / r["filename"]).is_file()
    assert len(synth.CLASSES) == 13 and len(set(synth.CLASSES)) == 13
    assert all(classes[s] == set(synth.CLASSES) for s in classes)  # every class in every split
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    n = {s: len(_csv_rows(synth_root, s)) for s in ("train", "val", "test")}
    assert sum(n.values()) == 260
    # 5 patients per class here (1 val, 1 test), so looser than at the default scale
    assert 0.5 <= n["train"] / 260 <= 0.8
    assert all(0.08 <= n[s] / 260 <= 0.3 for s in ("val", "test"))


def test_large_set_split_fractions(tmp_path):
    """About 70/15/15 of the images, by patient, at the default count's scale."""
    plans = synth._plan(2400, 0)
    counts = {"train": 0, "val": 0, "test": 0}
    for patient_of, split_of, _ in plans:
        for s in counts:
            counts[s] += int(np.isin(patient_of, np.flatnonzero(split_of == s)).sum())
    assert sum(counts.values()) == 2400
    assert abs(counts["train"] / 2400 - 0.70) < 0.03
    assert abs(counts["val"] / 2400 - 0.15) < 0.03 and abs(counts["test"] / 2400 - 0.15) < 0.03


def test_pngs_are_grey_8bit_of_the_requested_size(synth_root):
    files = sorted((synth_root / "radiology_ai").rglob("*.png"))
    assert len(files) == 260
    for f in files[::13]:
        with Image.open(f) as im:
            assert im.mode == "L" and im.size == (48, 48) and im.format == "PNG"


def test_both_layouts_give_the_same_samples(synth_root, synth_folders_root):
    rin, fol = open_source(synth_root), open_source(synth_folders_root)
    assert (rin.layout, fol.layout) == ("radimagenet", "folders")
    assert rin.classes == fol.classes == synth.CLASSES
    for split in ("train", "val", "test"):
        a, b = rin.split(split), fol.split(split)
        map_a = {Path(f).name: a.classes[y] for f, y in zip(a.files, a.labels)}
        map_b = {Path(f).name: b.classes[y] for f, y in zip(b.files, b.labels)}
        assert len(map_a) == len(a) and map_a == map_b
        by_name = {Path(f).name: f for f in b.files}
        for f in a.files[::7]:
            assert Path(f).read_bytes() == Path(by_name[Path(f).name]).read_bytes()


def test_label_column_is_anatomy_dash_label(synth_root):
    for r in _csv_rows(synth_root, "val"):
        parts = r["filename"].split("/")
        expected = f"{parts[2]}-{parts[3]}" if parts[1] != "US" else f"us-{parts[2]}"
        assert r["label"] == expected


def _thumbs(split):
    return np.stack([np.asarray(Image.open(f).resize((16, 16), Image.BILINEAR), np.float32)
                     .ravel() / 255 for f in split.files])


def test_learnable_not_trivial_and_modalities_distinct(tmp_path):
    """Nearest class centroid on 16x16 thumbnails: far above chance (binomial test against 1/13
    at level 1e-6) but far from perfect (lesions are small and jittered); the modality alone
    (CT / MR / US statistics) is nearly perfectly separable."""
    src = open_source(synth.make_synthetic(tmp_path / "d", images=1040, seed=1, size=32))
    tr, va = src.split("train"), src.split("val")
    xt, xv = _thumbs(tr), _thumbs(va)
    pred = NearestCentroid().fit(xt, tr.labels).predict(xv)
    hits = int((pred == va.labels).sum())
    assert binomtest(hits, len(va), 1 / 13, alternative="greater").pvalue < 1e-6
    assert hits / len(va) < 0.9
    modality = np.array([c[:2] for c in src.classes])
    mt, mv = modality[tr.labels], modality[va.labels]
    assert (NearestCentroid().fit(xt, mt).predict(xv) == mv).mean() > 0.9


def test_default_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path / "c1"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = synth.default_data_root()
    assert root.parent == tmp_path / "c1"
    assert root.name == f"synth-v{synth.GENERATOR_VERSION}-seed0-n2400-96px"
    monkeypatch.delenv("PGNM_FAST_CACHE")
    other = synth.default_data_root(images=100, seed=4, size=32)
    assert other.parent == tmp_path / "xdg" / "pgnm-fast" and "seed4-n100-32px" in other.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert synth.default_data_root().parent == tmp_path / "home" / ".cache" / "pgnm-fast"


def test_ensure_default_data_generates_once_then_reuses(monkeypatch, tmp_path):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path))
    logs = []
    root = synth.ensure_default_data(log=logs.append, images=52, seed=2, size=32)
    assert len(logs) == 1 and logs[0].startswith("Generated") and str(root) in logs[0]
    before = _files(root)
    again = synth.ensure_default_data(log=logs.append, images=52, seed=2, size=32)
    assert again == root and len(logs) == 2 and logs[1].startswith("Reusing")
    assert _files(root) == before
    assert len(open_source(root).split("train")) > 0
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left


def test_interrupted_generation_leaves_nothing_to_reuse(monkeypatch, tmp_path):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path))
    real = synth.make_synthetic

    def interrupted(out, **kw):
        real(out, **kw)  # everything written ...
        raise KeyboardInterrupt  # ... but stopped before the rename

    monkeypatch.setattr(synth, "make_synthetic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.ensure_default_data(log=lambda m: None, images=52, seed=2, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "make_synthetic", real)
    logs = []
    synth.ensure_default_data(log=logs.append, images=52, seed=2, size=32)
    assert logs[0].startswith("Generated")


def test_make_synthetic_refuses_bad_arguments(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="busy"):
        synth.make_synthetic(tmp_path / "busy", images=52, size=32)
    with pytest.raises(ConfigError, match="at least 39"):
        synth.make_synthetic(tmp_path / "few", images=20, size=32)
    with pytest.raises(ValueError, match="layout"):
        synth.make_synthetic(tmp_path / "x", images=52, size=32, layout="zip")


def test_ensure_default_data_refuses_a_foreign_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path))
    root = synth.default_data_root(images=52, seed=2, size=32)
    (root / "radiology_ai").mkdir(parents=True)
    with pytest.raises(DataError, match="no complete synthetic data set"):
        synth.ensure_default_data(log=lambda m: None, images=52, seed=2, size=32)
