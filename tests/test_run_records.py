"""Run records (provenance in config.json), file permissions from the umask, a quick --help."""
import os
import subprocess
import sys

import pytest

from pgnm_fast import cli, config, provenance
from pgnm_fast.atomic import atomic_open
from pgnm_fast.models.resnet import MODEL_CFGS
from pgnm_fast.names import MODELS
from pgnm_fast.run_state import save_checkpoint


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_open(tmp_path / "a.json", "w") as f:
            f.write("{}")
        save_checkpoint({"x": 1}, tmp_path / "b.pt")
        with open(tmp_path / "plain", "w"):  # what open() gives, for comparison
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("a.json", "b.pt", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_does_not_import_torch_scipy_or_sklearn(args):
    code = ("import sys\nfrom pgnm_fast.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'scipy', 'sklearn', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_the_cli_offers_the_names_the_library_knows():
    assert MODELS == tuple(MODEL_CFGS)
    assert set(cli.PRESETS) == set(config.PRESETS)


def test_run_record_holds_version_command_and_libraries(tmp_path, monkeypatch):
    record = provenance.run_record(["pgnm-fast", "train", "--out", "a b"])
    assert record["pgnm_fast"] == __import__("pgnm_fast").__version__
    assert record["command"] == "pgnm-fast train --out 'a b'"
    assert {"python", "torch", "numpy"} <= set(record["libraries"])
    assert provenance.git_commit(tmp_path) is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert provenance.git_commit() is None


def test_git_commit_of_a_checkout(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git program")
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert provenance.git_commit(tmp_path) == head + "-dirty"
