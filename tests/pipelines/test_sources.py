"""open_source over the RadImageNet CSV and class-folder layouts, and every DataError case."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgnm_fast import synth
from pgnm_fast.errors import DataError
from pgnm_fast.pipelines import open_source


def _rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.reader(f))


def _write(csv_path, rows):
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _raises(match, fn, *args, **kw):
    """The call raises DataError whose one-line message contains every string in ``match``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for m in [match] if isinstance(match, str) else match:
        assert str(m) in msg, msg
    return msg


def test_radimagenet_layout(synth_root):
    src = open_source(synth_root)
    assert src.layout == "radimagenet" and src.root == synth_root.resolve()
    assert src.splits == ["train", "val", "test"]
    assert src.classes == synth.CLASSES
    for name in src.splits:
        sp = src.split(name)
        rows = _rows(synth_root / f"RadiologyAI_{name}.csv")[1:]
        assert len(sp) == len(rows) and sp.name == name and sp.classes == src.classes
        assert sp.labels.dtype == np.int64 and sp.labels.shape == (len(rows),)
        for f, y, (fn, _label) in zip(sp.files, sp.labels, rows):
            assert Path(f).is_absolute() and Path(f).is_file()
            assert f == str(synth_root.resolve() / fn)
            assert sp.classes[y] == "__".join(fn.split("/")[1:-1])


def test_radimagenet_entry_points(synth_copy):
    want = {n: open_source(synth_copy).split(n).files for n in ("train", "val")}
    for path in (synth_copy / "radiology_ai", synth_copy / "RadiologyAI_val.csv"):
        src = open_source(path)
        assert src.split("train").files == want["train"] and src.split("val").files == want["val"]
    for f in synth_copy.glob("RadiologyAI_*.csv"):  # CSVs inside radiology_ai/, as some ship it
        f.rename(synth_copy / "radiology_ai" / f.name)
    for path in (synth_copy, synth_copy / "radiology_ai"):
        src = open_source(path)
        assert src.root == synth_copy.resolve()
        assert src.split("val").files == want["val"]


def test_csvs_apart_from_images_need_image_root(synth_copy, tmp_path):
    apart = tmp_path / "splits"
    apart.mkdir()
    for f in synth_copy.glob("RadiologyAI_*.csv"):
        shutil.move(str(f), apart / f.name)
    _raises([apart / "RadiologyAI_train.csv", "row 2:"], open_source, apart)
    src = open_source(apart, image_root=synth_copy)
    assert src.classes == synth.CLASSES and Path(src.split("test").files[0]).is_file()


def test_class_names_from_the_label_column(synth_root, tmp_path):
    src = open_source(synth_root, class_from="label")
    assert "abdomen-cyst" in src.classes and "us-normal" in src.classes
    assert len(src.classes) == 13
    # CSV rows of another shape than radiology_ai/...: the label column is used automatically
    (tmp_path / "imgs").mkdir()
    shutil.copy(src.split("train").files[0], tmp_path / "imgs" / "a.png")
    shutil.copy(src.split("train").files[-1], tmp_path / "imgs" / "b.png")
    _write(tmp_path / "RadiologyAI_train.csv",
           [["filename", "label"], ["imgs/a.png", "zeta"], ["imgs/b.png", "alpha"]])
    custom = open_source(tmp_path)
    assert custom.classes == ["alpha", "zeta"] and custom.splits == ["train"]
    assert custom.split("train").labels.tolist() == [1, 0]


def test_folder_layout(folders_copy):
    (folders_copy / "val" / ".ipynb_checkpoints").mkdir()  # hidden folders and files: skipped
    (folders_copy / "val" / "US__cyst" / "._resource-fork.png").write_bytes(b"\0\1")
    src = open_source(folders_copy)
    assert src.layout == "folders" and src.splits == ["train", "val", "test"]
    assert src.classes == synth.CLASSES
    sp = src.split("val")
    assert not any(Path(f).name.startswith(".") for f in sp.files)
    for f, y in zip(sp.files, sp.labels):
        assert Path(f).parent.name == sp.classes[y] and Path(f).parent.parent.name == "val"


def test_absent_split_is_reported_only_when_asked(synth_copy, folders_copy):
    (synth_copy / "RadiologyAI_test.csv").unlink()
    src = open_source(synth_copy)
    assert src.splits == ["train", "val"]
    _raises(["'test'", "present: train, val"], src.split, "test")
    shutil.rmtree(folders_copy / "test")
    src = open_source(folders_copy)
    assert src.splits == ["train", "val"]
    _raises(["'test'", str(folders_copy)], src.split, "test")


def test_missing_path_and_unknown_layout(tmp_path):
    _raises([tmp_path / "nope", "no such"], open_source, tmp_path / "nope")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    _raises([tmp_path / "random", "not a known data layout"], open_source, tmp_path / "random")
    _raises([tmp_path / "random" / "notes.txt", "not a known"], open_source,
            tmp_path / "random" / "notes.txt")


def test_val_without_train_csv(synth_copy):
    (synth_copy / "RadiologyAI_train.csv").unlink()
    _raises(["RadiologyAI_val.csv", "no RadiologyAI_train.csv"], open_source, synth_copy)


def test_empty_splits(synth_copy):
    _write(synth_copy / "RadiologyAI_val.csv", [["filename", "label"]])
    src = open_source(synth_copy)
    _raises([synth_copy / "RadiologyAI_val.csv", "empty"], src.split, "val")
    _write(synth_copy / "RadiologyAI_train.csv", [["filename", "label"]])
    _raises([synth_copy / "RadiologyAI_train.csv", "empty"], open_source, synth_copy)
    (synth_copy / "RadiologyAI_train.csv").write_text("")
    _raises([synth_copy / "RadiologyAI_train.csv", "header"], open_source, synth_copy)


def test_wrong_columns_and_bad_rows(synth_copy):
    rows = _rows(synth_copy / "RadiologyAI_train.csv")
    _write(synth_copy / "RadiologyAI_train.csv", [["path", "class"]] + rows[1:])
    _raises([synth_copy / "RadiologyAI_train.csv", "'path,class'", "filename,label"],
            open_source, synth_copy)
    _write(synth_copy / "RadiologyAI_train.csv", rows[:4] + [[rows[4][0]]] + rows[5:])
    _raises([synth_copy / "RadiologyAI_train.csv", "row 5"], open_source, synth_copy)


def test_rows_naming_missing_files(synth_copy):
    csv_path = synth_copy / "RadiologyAI_val.csv"
    rows = _rows(csv_path)
    gone = [3, 7, 8, 11, len(rows) - 1]  # list indices = CSV line numbers - 1
    for i in gone:
        (synth_copy / rows[i][0]).unlink()
    src = open_source(synth_copy)  # train is intact
    msg = _raises([csv_path, f"{len(gone)} of {len(rows) - 1} rows",
                   f"row 4: {rows[3][0]}", f"row 8: {rows[7][0]}", f"row 9: {rows[8][0]}"],
                  src.split, "val")
    assert rows[10][0] not in msg  # only the first few are listed
    (synth_copy / _rows(synth_copy / "RadiologyAI_train.csv")[1][0]).unlink()
    _raises(["RadiologyAI_train.csv", "1 of", "row 2:"], open_source, synth_copy)


def test_label_absent_from_train(synth_copy, folders_copy):
    rows = _rows(synth_copy / "RadiologyAI_test.csv")
    extra = "radiology_ai/CT/abdomen/stone/ct-abdomen-stone-p99999-01.png"
    (synth_copy / extra).parent.mkdir()
    shutil.copy(synth_copy / rows[1][0], synth_copy / extra)
    _write(synth_copy / "RadiologyAI_test.csv", rows + [[extra, "abdomen-stone"]])
    src = open_source(synth_copy)
    _raises(["RadiologyAI_test.csv", "CT__abdomen__stone", "absent from the train"],
            src.split, "test")
    shutil.copytree(folders_copy / "val" / "US__cyst", folders_copy / "val" / "US__stone")
    _raises([folders_copy / "val", "US__stone"], open_source(folders_copy).split, "val")


def test_empty_class_folders(folders_copy):
    empty = folders_copy / "val" / "MR__knee__cyst"
    for f in empty.iterdir():
        f.unlink()
    (empty / "readme.txt").write_text("not an image")
    src = open_source(folders_copy)
    _raises([empty, "empty class folder"], src.split, "val")
    shutil.rmtree(empty)
    assert len(src.split("test")) > 0
    for d in (folders_copy / "train").iterdir():
        shutil.rmtree(d)
    _raises([folders_copy / "train", "no class folders"], open_source, folders_copy)
