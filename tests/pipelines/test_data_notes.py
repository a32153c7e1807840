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


@pytest.mark.slow
def test_two_training_stages_in_one_command_print_the_note_once(small_data, tmp_path):
    """As a compare runs its stages: two runs in one process on data with 16-bit PNGs."""
    import shutil

    from click.testing import CliRunner

    from pgnm_fast.cli import main
    data = shutil.copytree(small_data, tmp_path / "data")
    for f in sorted(data.rglob("*.png"))[::10]:  # every tenth file, train and val alike
        with Image.open(f) as im:
            deep = np.asarray(im.convert("L")).astype(np.uint16) * 257
        Image.fromarray(deep).save(f)
    outputs = []
    for stage in ("a", "b"):
        r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(data), "--out",
                                      str(tmp_path / stage), "--epochs", "1", "-b", "16",
                                      "--train-crop-size", "32", "--val-resize-size", "36",
                                      "--val-crop-size", "32", "-j", "0", "--loader", "dali"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    notes = [[ln for ln in out.splitlines() if "not 8-bit grey PNGs" in ln] for out in outputs]
    assert [len(n) for n in notes] == [2, 0], notes  # train and val, said by the first run only
    assert sorted(ln.split(" files ")[0].split()[-1] for ln in notes[0]) == ["train", "val"]
    for line in notes[0]:
        listed = line.rsplit("; listed in ", 1)[1]
        assert len(open(listed).read().splitlines()) == int(line.split(" of ")[0])
