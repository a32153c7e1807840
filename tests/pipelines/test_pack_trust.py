"""A packed cache is trusted by its seal: a file edited after pack (or after the last passed
``pack --verify``) stops a run at start with one line that says to run ``pack --verify``."""
import os
import shutil
from pathlib import Path

import pytest
from cache_edits import EDITS, change_a_label, flip_a_pixel
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.errors import DataError
from pgnm_fast.pipelines import make_loader
from pgnm_fast.pipelines.pack import MANIFEST, verify


def quiet(*_):
    pass



@pytest.fixture
def cache(packed, tmp_path):
    """A private copy of the packed conftest set (times kept, so it stays sealed)."""
    return Path(shutil.copytree(packed, tmp_path / "cache"))


@pytest.mark.parametrize("backend", ["torch", "device"])
@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_cache_stops_both_loaders_with_one_line(cache, backend, edit):
    make_loader(cache, train=True, batch_size=8, crop_size=24, backend=backend, workers=0,
                log=quiet)  # sealed: read as it is
    change, name = EDITS[edit]
    change(cache)
    with pytest.raises(DataError) as e:
        make_loader(cache, train=True, batch_size=8, crop_size=24, backend=backend, workers=0,
                    log=quiet)
    msg = str(e.value)
    assert msg.startswith(str(cache / name)) and f"run pgnm-fast pack --verify {cache}" in msg
    assert "\n" not in msg


def test_a_label_changed_under_the_old_time_is_caught_by_its_hash(cache):
    st = os.stat(cache / "records.npy")
    change_a_label(cache)
    os.utime(cache / "records.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match=r"records\.npy: content differs .* pack --verify"):
        make_loader(cache, train=True, batch_size=8, crop_size=24, backend="torch", log=quiet)


def test_verify_renews_the_seal_only_when_every_hash_matches(cache):
    os.utime(cache / "images.u8")  # touched, the content as packed
    with pytest.raises(DataError, match="images.u8: changed since"):
        make_loader(cache, train=True, batch_size=8, crop_size=24, backend="torch", log=quiet)
    verify(cache, log=quiet)
    make_loader(cache, train=True, batch_size=8, crop_size=24, backend="torch", log=quiet)
    before = (cache / MANIFEST).read_text()
    flip_a_pixel(cache)
    with pytest.raises(DataError, match="does not match its content hash"):
        verify(cache, log=quiet)
    assert (cache / MANIFEST).read_text() == before  # a failed verify leaves the seal
    with pytest.raises(DataError, match="images.u8: changed since"):
        make_loader(cache, train=True, batch_size=8, crop_size=24, backend="device", log=quiet)


@pytest.mark.parametrize("loader", ["torch", "device"])
def test_train_on_an_edited_cache_is_one_error_line(cache, tmp_path, loader):
    flip_a_pixel(cache)
    r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(cache), "--out",
                                  str(tmp_path / "run"), "--epochs", "1", "-b", "16",
                                  "--train-crop-size", "32", "-j", "0", "--loader", loader])
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert lines[0].startswith("Error: ") and "pack --verify" in lines[0]
    assert not (tmp_path / "run").exists()
