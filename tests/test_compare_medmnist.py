"""compare and transfer on a MedMNIST-layout .npz (written here with numpy, 28 px)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pgnm_fast.cli import main


def _npz(path, n=(48, 16, 16), classes=4, size=28, seed=0):
    """MedMNIST's layout: ``{split}_images`` uint8 (N, H, W), ``{split}_labels`` (N, 1); the
    class shows as the brightness of the upper half."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, count in zip(("train", "val", "test"), n):
        labels = np.arange(count) % classes
        images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        images[:, : size // 2] = (labels * 60).astype(np.uint8)[:, None, None]
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_compare_two_seeds_then_transfer_on_a_medmnist_file(tmp_path):
    data = _npz(tmp_path / "small.npz")
    out = tmp_path / "cmp"
    r = cli("compare", "--data", data, "--seeds", "2", "--out", out, "--epochs", "1",
            "--finetune-epochs", "1", "-b", "8", "-j", "0", "--img-size", "24", "--grid", "8",
            "--resamples", "50")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1] and report["layout"] == "medmnist"
    assert report["n_images"] == 16 and report["classes"] == 4
    assert "reference not shown" in r.output and "medmnist layout, 4 classes" in r.output
    tr = tmp_path / "tr"
    r = cli("transfer", "--data", data, "--from", out / "seed-0" / "finetune" / "best.pt",
            "--label", "PGNM", "--from", out / "seed-0" / "baseline" / "best.pt", "--label",
            "baseline", "--shots", "4,8", "--repeats", "1", "--steps", "2", "-b", "4", "-j", "0",
            "--out", tr)
    assert r.exit_code == 0, r.output
    result = json.loads((tr / "transfer.json").read_text())
    assert result["settings"]["data"] == str(data.resolve())
    assert result["settings"]["inputs"]["PGNM"]["val_crop_size"] == 24
    assert sorted((x["checkpoint"], x["n"]) for x in result["runs"]) == [
        ("PGNM", 4), ("PGNM", 8), ("baseline", 4), ("baseline", 8)]
    assert all(0 <= x["f1_macro"] <= 1 for x in result["runs"])
