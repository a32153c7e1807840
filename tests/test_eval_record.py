"""`eval --json` records what produced its numbers; `--predictions --all-scores` every score."""
import csv
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pgnm_fast import __version__
from pgnm_fast.cli import main
from pgnm_fast.pipelines import MEAN, STD


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    r = cli("train", "--no-policy", "--data", small_data, "--out", out, "--epochs", "1", "-b",
            "16", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
            "-j", "0")
    assert r.exit_code == 0, r.output
    return out / "best.pt"


def test_eval_json_records_checkpoint_data_split_transforms_and_version(checkpoint, small_data,
                                                                        tmp_path):
    js, preds = tmp_path / "val.json", tmp_path / "pred.csv"
    r = cli("eval", "--checkpoint", checkpoint, "--split", "val", "--json", js, "--predictions",
            preds, "--all-scores", "-j", "0")
    assert r.exit_code == 0, r.output
    record = json.loads(js.read_text())
    assert record["checkpoint"] == str(checkpoint.resolve())
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["data"] == str(small_data.resolve()) and record["split"] == "val"
    assert record["transforms"] == {"resize_size": 36, "crop_size": 32, "mean": MEAN,
                                    "std": STD, "channels": 1}
    assert record["pgnm_fast_version"] == __version__ and record["n_images"] > 0
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    score_cols = [c for c in rows[0] if c.startswith("score:")]
    assert len(score_cols) == record["classes"] > 5
    scores = np.array([[float(r[c]) for c in score_cols] for r in rows])
    assert scores.sum(1) == pytest.approx(1, abs=1e-4)
    best = [score_cols[i].removeprefix("score:") for i in scores.argmax(1)]
    assert best == [r["predicted"] for r in rows]
    assert [float(r["top1_score"]) for r in rows] == pytest.approx(scores.max(1), abs=1e-6)


def test_all_scores_without_predictions_is_one_line(checkpoint):
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(checkpoint), "--all-scores"])
    assert r.exit_code != 0 and "Error:" in r.output and "--predictions" in r.output
    assert "Traceback" not in r.output
