"""compare --score: hand-run stages get the same statistics, table and compare.json as compare."""
import json

import pytest
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.compare_report import _table
from pgnm_fast.synth import make_synthetic

FAST = ["--epochs", "1", "--finetune-epochs", "1", "-b", "16", "-j", "0", "--grid", "8",
        "--resamples", "100"]


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.mark.slow
def test_score_of_compares_own_runs_gives_its_table(tmp_path):
    data = make_synthetic(tmp_path / "synth", images=240, seed=13, size=40)
    out = tmp_path / "cmp"
    r = cli("compare", "--data", data, "--out", out, "--seeds", "2", *FAST, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    trained = json.loads((out / "compare.json").read_text())
    runs = [out / f"seed-{s}" / stage for s in (0, 1) for stage in ("finetune", "baseline")]
    r = cli("compare", "--score", *runs, "--out", tmp_path / "scored", "--resamples", "100",
            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    scored = json.loads((tmp_path / "scored" / "compare.json").read_text())
    assert scored["seeds"] == [0, 1] and scored["scored"][1]["pgnm"]["stage"] == "finetune"
    assert scored["scored"][0]["baseline"]["checkpoint"].endswith("best.pt")
    for key in ("test", "difference", "n_images", "classes", "metrics"):
        assert scored[key] == trained[key], key
    assert _table(scored) == _table(trained)
    for line in _table(trained):
        assert line in r.output
    assert (tmp_path / "scored" / "compare.png").stat().st_size > 10_000
    # the same pairs from a list file (paths relative to it)
    listing = out / "pairs.txt"
    listing.write_text("# PGNM baseline\nseed-0/finetune seed-0/baseline\n"
                       "seed-1/finetune, seed-1/baseline\n")
    r = cli("compare", "--score", listing, "--out", tmp_path / "listed", "--resamples", "100",
            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    listed = json.loads((tmp_path / "listed" / "compare.json").read_text())
    assert listed["difference"] == trained["difference"]


def test_score_refuses_odd_runs_and_folders_without_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, said in ((["a"], "takes pairs"), ([tmp_path / "empty", tmp_path / "empty"],
                                                 "has no best.pt or last.pt")):
        r = cli("compare", "--score", *args, "--out", tmp_path / "o")
        assert r.exit_code != 0 and said in r.output and r.output.count("Error:") == 1, r.output
    r = cli("compare", "a", "b")
    assert r.exit_code != 0 and "only with --score" in r.output, r.output
    r = cli("compare", "--score", "a", "b", "--heated-lr", "0.1")
    assert r.exit_code != 0 and "trains nothing" in r.output, r.output
