"""A data note (files DALI cannot decode itself, bad files left out) is said once per process,
with its count and where the full list is, however many loaders a command opens on the data."""
import numpy as np
import pytest
from PIL import Image

from pgnm_fast.pipelines import badfiles, startup
from pgnm_fast.pipelines.factory import make_loader
from pgnm_fast.pipelines.sources import open_source

pytest.importorskip("nvidia.dali")


@pytest.fixture
def mixed(tmp_path):
    """A class-folder set: per class 4 8-bit grey PNGs, 1 16-bit PNG, and one broken file."""
    rng = np.random.default_rng(3)
    for label in ("a", "b"):
        d = tmp_path / "train" / label
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (30, 30), np.uint8)).save(d / f"{i}.png")
        Image.fromarray(rng.integers(0, 65535, (30, 30)).astype(np.uint16)).save(d / "deep.png")
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return tmp_path


def test_two_stages_over_the_same_data_say_each_note_once(mixed):
    logs = []
    split = open_source(mixed).split("train")
    for _stage in range(2):  # a compare's stages (and seeds) open the same split again
        make_loader(split, train=True, batch_size=4, crop_size=24, resize_size=26, backend="dali",
                    on_bad_image="skip", log=logs.append)
    deep = [ln for ln in logs if "not 8-bit grey PNGs" in ln]
    skipped = [ln for ln in logs if ln.startswith("skipped ")]
    assert len(deep) == 1 and len(skipped) == 1, logs
    folder = startup.cache_folder(mixed)
    assert deep[0].startswith("2 of 12 train files are not 8-bit grey PNGs")
    assert deep[0].endswith(f"; listed in {folder / 'not-grey8-train.txt'}")
    listed = (folder / "not-grey8-train.txt").read_text().splitlines()
    assert len(listed) == 2 and all(ln.split("\t")[0].endswith("deep.png") for ln in listed)
    assert skipped[0].startswith(f"skipped 2 bad file(s), listed in {folder / 'bad-train.txt'}; ")
    bad = (folder / "bad-train.txt").read_text().splitlines()
    assert len(bad) == 2 and all(ln.split("\t")[0].endswith("broken.png") for ln in bad)


def test_a_different_note_is_said_again():
    logs = []
    assert badfiles.say_once("3 of 9 train files differ", logs.append)
    assert not badfiles.say_once("3 of 9 train files differ", logs.append)
    assert badfiles.say_once("4 of 9 train files differ", logs.append)
    assert logs == ["3 of 9 train files differ", "4 of 9 train files differ"]
