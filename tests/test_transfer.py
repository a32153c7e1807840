"""pgnm-fast transfer: few-shot subsets, a new head on a kept trunk, the grid end to end (CPU)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pgnm_fast import run_state as ckpt_io
from pgnm_fast.cli import main
from pgnm_fast.config import make_config
from pgnm_fast.models import create_model
from pgnm_fast.pipelines.sources import open_source
from pgnm_fast.synth import CLASSES, make_synthetic
from pgnm_fast.transfer import _model, score_limits
from pgnm_fast.transfer_subsets import draw_subset, feasible_shots, parse_shots


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """A downstream set whose 5 classes the default set (and so the checkpoints) never had."""
    return make_synthetic(tmp_path_factory.mktemp("unseen"), images=150, seed=4, size=40,
                          concepts="unseen")


def _checkpoint(path, seed):
    """A pretrained-looking checkpoint on the default 13 classes (random weights, moved BN)."""
    torch.manual_seed(seed)
    model = create_model("resnet10t", len(CLASSES))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    cfg = make_config("baseline", "tiny", train_crop_size=32, val_resize_size=36,
                      val_crop_size=32, grid=8)
    ckpt_io.save_checkpoint({"stage": "baseline", "epoch": 0, "model_name": "resnet10t",
                             "classes": list(CLASSES), "in_chans": 1,
                             "model": model.state_dict(), "config": dataclasses.asdict(cfg)},
                            path)
    return path


def test_unseen_concepts_share_no_class_with_the_default_set(unseen):
    classes = open_source(unseen).classes
    assert len(classes) == 5 and not set(classes) & set(CLASSES)


def test_subsets_are_stratified_reproducible_and_differ_by_repeat():
    labels = np.repeat(np.arange(5), [30, 12, 50, 20, 9])
    for n in (16, 32, 44):
        a = draw_subset(labels, n, 5, seed=7, repeat=0)
        assert len(a) == len(set(a)) == n
        counts = np.bincount(labels[a], minlength=5)
        assert counts.min() >= n // 5 and counts.max() <= n // 5 + 1  # stratified
        assert np.array_equal(a, draw_subset(labels, n, 5, seed=7, repeat=0))  # reproducible
        assert not np.array_equal(a, draw_subset(labels, n, 5, seed=7, repeat=1))
        assert not np.array_equal(a, draw_subset(labels, n, 5, seed=8, repeat=0))


def test_short_class_skips_the_shots_it_cannot_supply_naming_it():
    names = ["a", "b", "c"]
    labels = np.repeat(np.arange(3), [40, 7, 40])
    said = []
    assert feasible_shots([3, 16, 21, 22, 64], labels, names, said.append) == [3, 16, 21]
    assert len(said) == 2 and all("class b has 7" in s for s in said)
    assert "n=22" in said[0] and "up to 8 training images per class" in said[0]
    with pytest.raises(Exception, match="class b has 7 training images"):
        feasible_shots([64], labels, names, said.append)
    with pytest.raises(Exception, match="--shots must be comma-separated positive"):
        parse_shots("16,x")


def test_new_head_keeps_the_trunk_and_probe_freezes_all_but_the_head(tmp_path):
    state = ckpt_io.load_run_state(_checkpoint(tmp_path / "c.pt", 0))
    model, params = _model(state, ["p", "q", "r"], torch.device("cpu"), probe=True)
    own = model.state_dict()
    assert own["fc.weight"].shape[0] == 3
    trunk = [k for k in state.model if not k.startswith("fc.")]
    assert trunk and all(torch.equal(own[k], state.model[k]) for k in trunk)
    assert {id(p) for p in params} == {id(p) for p in model.fc.parameters()}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # frozen BatchNorm
    full, params = _model(state, ["p", "q", "r"], torch.device("cpu"), probe=False)
    assert len(params) == len(list(full.parameters())) and all(m.training for m in full.modules())


def test_transfer_grid_end_to_end(unseen, tmp_path):
    a, b = _checkpoint(tmp_path / "a" / "best.pt", 1), _checkpoint(tmp_path / "b" / "best.pt", 2)
    out = tmp_path / "tr"
    r = CliRunner().invoke(main, ["transfer", "--from", str(a), "--from", str(b), "--data",
                                  str(unseen), "--shots", "5,10,120", "--repeats", "2",
                                  "--steps", "2", "-b", "8", "-j", "0", "--out", str(out),
                                  "--probe"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "transfer.json").read_text())
    assert "skipping n=120" in r.output and "has " in r.output  # 120 over 5: 24 a class
    assert report["settings"]["shots"] == [5, 10] and report["settings"]["probe"]
    runs = report["runs"]
    assert len(runs) == 2 * 2 * 2 and {x["checkpoint"] for x in runs} == {"a", "b"}
    test = open_source(unseen).split("test")
    for x in runs:
        assert 0 <= x["f1_macro"] <= 1 and 0 <= x["roc_auc_ovo_macro"] <= 1
    cell = report["summary"]["a"]["10"]["f1_macro"]
    assert cell["mean"] == pytest.approx(np.mean(cell["values"])) and len(cell["values"]) == 2
    assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    assert (out / "transfer.png").stat().st_size > 10_000
    assert "8 of 8 runs trained, 0 reused" in r.output
    diff = report["differences"]["b"]["10"]["f1_macro"]
    assert report["reference"] == "a" and set(report["differences"]) == {"b"}
    assert "paired difference against a" in r.output and "b - a" in r.output
    assert -1 <= diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1] <= 1
    assert "a" in r.output and f"({len(test)} test images)" in r.output


def test_transfer_bad_input_is_one_line(unseen, tmp_path):
    a = _checkpoint(tmp_path / "a.pt", 1)
    r = CliRunner().invoke(main, ["transfer", "--from", str(a), "--data", str(unseen),
                                  "--shots", "400", "--out", str(tmp_path / "tr")])
    assert r.exit_code != 0 and "Error:" in r.output and "training images" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "tr").exists()
    r = CliRunner().invoke(main, ["transfer", "--from", str(a), "--data", str(unseen),
                                  "--reference", "zz", "--out", str(tmp_path / "tr")])
    assert r.exit_code != 0 and "Error:" in r.output and "--reference 'zz'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "tr").exists()
    r = CliRunner().invoke(main, ["transfer", "--from", str(tmp_path / "none.pt"), "--data",
                                  str(unseen)])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_interrupted_transfer_continues_and_other_protocols_are_refused(unseen, tmp_path):
    """A run lost to an interrupt is trained again (and equals the uninterrupted one); finished
    runs are reused; a folder made under another protocol or checkpoint is refused by name."""
    a, b = _checkpoint(tmp_path / "a" / "best.pt", 1), _checkpoint(tmp_path / "b" / "best.pt", 2)
    out = tmp_path / "tr"
    args = ["transfer", "--from", str(a), "--from", str(b), "--data", str(unseen), "--shots",
            "10", "--repeats", "2", "--steps", "2", "-b", "8", "-j", "0", "--out", str(out),
            "--probe"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    whole = json.loads((out / "transfer.json").read_text())
    cut = dict(whole, runs=whole["runs"][:3])  # as the file stands after the third run
    cut.pop("summary")
    (out / "transfer.json").write_text(json.dumps(cut))
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "3 of 4 runs reused" in r.output and r.output.count("n=10 repeat") == 1
    assert "1 of 4 runs trained, 3 reused" in r.output
    again = json.loads((out / "transfer.json").read_text())
    strip = [{k: v for k, v in x.items() if k != "seconds"} for x in whole["runs"]]
    assert [{k: v for k, v in x.items() if k != "seconds"} for x in again["runs"]] == strip
    assert again["summary"] == whole["summary"]
    # more repeats add to the folder: the four runs reused, two new ones
    def setting(flag, value):
        return [value if i and args[i - 1] == flag else x for i, x in enumerate(args)]

    r = CliRunner().invoke(main, setting("--repeats", "3"), catch_exceptions=False)
    assert r.exit_code == 0 and "4 of 6 runs reused" in r.output, r.output
    # another protocol, another checkpoint under the same name: one line each, nothing lost
    before = (out / "transfer.json").read_bytes()
    r = CliRunner().invoke(main, setting("--steps", "3"))
    assert r.exit_code != 0 and "--steps" in r.output and "Traceback" not in r.output, r.output
    _checkpoint(tmp_path / "a" / "best.pt", 7)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "'a'" in r.output and "--label" in r.output, r.output
    assert (out / "transfer.json").read_bytes() == before


@pytest.mark.parametrize("auto,expected", [((0.999, 1.001), (0.9, 1.02)),  # every score 1.0
                                           ((0.42, 0.97), (0.42, 0.99)),
                                           ((-0.05, 0.3), (0.0, 0.32))])
def test_score_axis_stays_in_the_unit_interval_and_shows_equal_scores(auto, expected):
    assert score_limits(*auto) == pytest.approx(expected)


def _export(checkpoint, folder):
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(folder)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return folder


def test_transfer_reads_every_weights_form_side_by_side(unseen, tmp_path):
    """A pgnm-fast checkpoint, a timm folder (`export`) and a plain .safetensors state dict
    fine-tune in one transfer; the timm folder of b trains exactly as b's own checkpoint."""
    import shutil
    a, b = _checkpoint(tmp_path / "a" / "best.pt", 1), _checkpoint(tmp_path / "b" / "best.pt", 2)
    timm = _export(b, tmp_path / "timm-b")
    plain = tmp_path / "plain" / "model.safetensors"
    plain.parent.mkdir()
    shutil.copy(_export(_checkpoint(tmp_path / "c" / "best.pt", 3), tmp_path / "exp-c")
                / "model.safetensors", plain)
    out = tmp_path / "tr"
    args = ["transfer", "--data", str(unseen), "--shots", "5", "--repeats", "1", "--steps", "2",
            "-b", "5", "-j", "0", "--out", str(out)]
    for path, label in ((a, "pgnm"), (b, "b"), (timm, "timm"), (plain, "plain")):
        args += ["--from", str(path), "--label", label]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "transfer.json").read_text())
    runs = {x["checkpoint"]: x for x in report["runs"]}
    assert set(runs) == {"pgnm", "b", "timm", "plain"} and len(report["runs"]) == 4
    settings = report["settings"]
    assert settings["checkpoint_kinds"] == {"pgnm": "pgnm-fast", "b": "pgnm-fast",
                                            "timm": "timm folder", "plain": "state dict"}
    # the timm folder's pretrained_cfg gives b's crops; a bare state dict the defaults
    assert settings["inputs"]["timm"] == settings["inputs"]["b"]
    assert settings["inputs"]["timm"]["val_crop_size"] == 32
    assert settings["inputs"]["plain"]["val_crop_size"] == 224
    assert settings["inputs"]["plain"]["channels"] == 1
    assert runs["timm"]["train_loss"] == pytest.approx(runs["b"]["train_loss"], rel=1e-5)
    assert runs["timm"]["f1_macro"] == pytest.approx(runs["b"]["f1_macro"], abs=1e-9)
    assert runs["pgnm"]["train_loss"] != pytest.approx(runs["b"]["train_loss"], rel=1e-3)
    assert len(set(settings["checkpoint_sha256"].values())) == 4


def test_transfer_refuses_a_label_or_a_file_given_twice(unseen, tmp_path):
    a, b = _checkpoint(tmp_path / "a" / "best.pt", 1), _checkpoint(tmp_path / "b" / "best.pt", 2)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(a.read_bytes())
    base = ["transfer", "--data", str(unseen), "--out", str(tmp_path / "tr")]
    for froms, labels, said in (
            ((a, b), ("x", "x"), "--label 'x' names two"),
            ((a, tmp_path / "a" / ".." / "a" / "best.pt"), ("x", "y"), "each checkpoint once"),
            ((a, copy), ("x", "y"), "has the same content as")):
        args = base + [w for f, n in zip(froms, labels) for w in ("--from", str(f), "--label", n)]
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and said in r.output, r.output
        assert r.output.count("Error:") == 1 and "Traceback" not in r.output
        assert not (tmp_path / "tr").exists()
