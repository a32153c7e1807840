"""Bad input: one clear line naming the problem, a non-zero exit, no traceback, nothing written."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.synth import make_synthetic

SMALL = ["--epochs", "1", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "--grid", "8", "-j", "0", "--impl", "reference"]


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "heated"
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), *SMALL],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def fails(args, *needles):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code != 0, r.output
    error_lines = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert str(needle) in error_lines[0], r.output
    return error_lines[0]


def test_missing_data_path(tmp_path):
    out = tmp_path / "run"
    fails(["train", "--data", tmp_path / "nope", "--out", out, *SMALL], tmp_path / "nope")
    assert not out.exists()


def test_empty_data_path(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    fails(["train", "--data", tmp_path / "empty", "--out", out, *SMALL], "empty")
    assert not out.exists()


def test_csv_row_naming_a_missing_file(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = next((copy / "radiology_ai").rglob("*.png"))
    victim.unlink()
    out = tmp_path / "run"
    line = fails(["train", "--data", copy, "--out", out, *SMALL], victim.name)
    assert "RadiologyAI_" in line
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "resume", "finetune"])
def test_truncated_checkpoint(trained, tmp_path, command):
    bad = tmp_path / "bad.pt"
    blob = (trained / "last.pt").read_bytes()
    bad.write_bytes(blob[: len(blob) // 3])
    out = tmp_path / "run"
    args = {"eval": ["eval", "--checkpoint", bad],
            "resume": ["train", "--resume", bad, "--out", out],
            "finetune": ["finetune", "--from", bad, "--out", out]}[command]
    fails(args, bad)
    assert not out.exists()


def test_unknown_model_name(data, tmp_path):
    out = tmp_path / "run"
    fails(["train", "--data", data, "--out", out, "--model", "resnet99"], "--model", "resnet99")
    assert not out.exists()


def test_existing_run_folder_is_not_overwritten(data, trained):
    before = (trained / "last.pt").read_bytes()
    fails(["train", "--data", data, "--out", trained, *SMALL], "--resume")
    assert (trained / "last.pt").read_bytes() == before


def test_test_split_lacking_classes_warns_and_scores_present_ones(trained, data, tmp_path):
    """A class-folder copy of the test split without two classes: metrics over the rest."""
    folders = make_synthetic(tmp_path / "f", images=240, seed=5, size=40, layout="folders")
    test_dir = folders / "test"
    dropped = sorted(p.name for p in test_dir.iterdir())[:2]
    for name in dropped:
        shutil.rmtree(test_dir / name)
    out_json = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(trained / "best.pt"), "--data",
                                  str(folders), "--json", str(out_json), "-j", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    warning = [line for line in r.output.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and all(name in warning[0] for name in dropped)
    assert out_json.exists()


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point, not just click's test runner: exit 2, one line on stderr."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "pgnm_fast", "train", "--data", str(tmp_path / "x"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert str(tmp_path / "x") in p.stderr and not (tmp_path / "run").exists()
