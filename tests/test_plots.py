"""Pictures, per-class tables, TensorBoard events and console lines of a run (headless, CPU)."""
import csv
import json
import re
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pgnm_fast import observe, plots
from pgnm_fast.cli import main
from pgnm_fast.metrics import mean_cross_entropy

SMALL = ["--epochs", "2", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "2", "--seed", "3", "--grid", "8"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_picture(path, min_side=300):
    """A PNG that is not blank: readable, big enough, with more than one colour."""
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)
        assert np.asarray(im.convert("L")).std() > 5, f"{path} is blank"


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


@pytest.fixture(scope="module")
def heated(data, tmp_path_factory):
    """A 2-epoch heated run with --tensorboard; every gallery save kept (copies) per epoch."""
    out = tmp_path_factory.mktemp("runs") / "heated"
    saved = []
    real = plots.save_gallery
    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "save_gallery", lambda g, p: (saved.append({k: np.copy(v) for k, v in g.items()}),
                                                     real(g, p))[1])
    try:
        r = cli("train", "--data", data, "--out", out, "--tensorboard", *SMALL)
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    return out, r.output, saved


@pytest.mark.slow
def test_a_heated_run_draws_its_pictures_and_tables(heated):
    out, _, _ = heated
    for name in ("curves.png", "masks.png", "confusion.png"):
        assert_picture(out / name)
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((out / "config.json").read_text())
    assert len(rows) == 13 and set(rows[0]) == {"class", "precision", "recall", "f1", "support"}
    # the table is the validation of best.pt: its support sums to the val split, its mean F1 is
    # best.pt's macro F1 over the classes present
    import torch
    best = torch.load(out / "best.pt", weights_only=True)
    support = np.array([int(r["support"]) for r in rows])
    assert support.sum() == best["val_metrics"]["n_images"]
    f1 = np.array([float(r["f1"]) for r in rows])[support > 0]
    assert f1.mean() == pytest.approx(best["val_metrics"]["f1_macro"], abs=1e-3)
    matrix, names = plots.read_confusion(out / "confusion.csv")
    assert names == [r["class"] for r in rows] and (matrix.sum(1) == support).all()
    record = classes["run_record"]
    assert record["pgnm_fast"] and record["command"] and "git_commit" in record
    assert {"torch", "numpy", "python"} <= set(record["libraries"])


def test_the_gallery_shows_the_same_images_every_epoch_across_classes_and_modalities(heated):
    out, _, saved = heated
    assert len(saved) == 2  # one per epoch
    first, second = saved
    np.testing.assert_array_equal(first["images"], second["images"])
    assert list(first["classes"]) == list(second["classes"])
    names = list(first["classes"])
    assert len(set(names)) == len(names) == observe.GALLERY_SIZE
    assert {n.split("__")[0] for n in names} == {"CT", "MR", "US"}
    assert not np.array_equal(first["expected"], second["expected"])  # the policy moved
    for key in ("expected", "sampled", "uncond_mean"):
        assert 0 <= first[key].min() and first[key].max() <= 1, key
    masks = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "masks"]
    assert [m["epoch"] for m in masks] == [0, 1]
    assert all(0 < m["mask_mean"] < 1 and m["mask_entropy"] <= 0 for m in masks)


def test_spread_classes_alternates_modalities_then_anatomies():
    names = ["CT__abdomen__a", "CT__abdomen__b", "CT__lung__c", "MR__knee__d", "MR__knee__e",
             "US__thyroid__f"]
    order = [names[i] for i in observe.spread_classes(names)]
    assert order[:3] == ["CT__abdomen__a", "MR__knee__d", "US__thyroid__f"]
    assert order[3] == "CT__lung__c" and sorted(order) == sorted(names)
    assert observe.spread_classes(["b", "a", "c"]) == [0, 1, 2]  # no modality in the names


def test_non_tty_output_has_step_lines_named_losses_and_fits_120_columns(heated):
    _, output, _ = heated
    steps = [ln for ln in output.splitlines() if re.match(r"epoch \d \[ *\d+/\d+\]", ln)]
    assert len(steps) >= 4
    assert re.search(r"ce \d\.\d{4}  objective \d+\.\d{4}  S \d+\.\d{3}  top1 \d\.\d{3}  \d+ img/s  "
                     r"eta \d+:\d\d:\d\d$", steps[0]), steps[0]
    epoch = [ln for ln in output.splitlines() if ln.startswith("epoch 1/1: train ce ")]
    assert epoch and " objective " in epoch[0] and " lr " in epoch[0] and " s (val " in epoch[0]
    policy = [ln for ln in output.splitlines() if ln.startswith("  policy: mask spread ")]
    assert len(policy) == 2 and all(re.search(r"grad norm \d", ln) for ln in policy)
    assert "  val (unconditional masks): top1 " in output
    no_path = [ln for ln in output.splitlines() if ln.strip() and "/" not in ln.split()[-1]]
    assert len(no_path) > 10 and all(len(ln) <= 120 for ln in no_path)


def test_tensorboard_events_hold_the_scalars_and_mask_images(heated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = heated
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/ce", "train/objective", "train/S", "val/f1_macro", "lr/classifier",
                "masks/entropy", "speed/img_s", "policy/mask_spread", "policy/grad_norm"):
        assert tag in tags["scalars"], tag
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "step"]
    assert [e.step for e in acc.Scalars("train/ce")] == steps  # each step record exactly once
    assert any(t.startswith("masks/expected") for t in tags["images"])


@pytest.mark.slow
def test_plot_redraws_from_the_run_folder_and_from_metrics_jsonl_alone(heated, tmp_path):
    out, _, _ = heated
    run = tmp_path / "copy"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("*.png", "*.pt", "tensorboard"))
    r = cli("plot", run)
    assert r.exit_code == 0, r.output
    for name in ("curves.png", "masks.png", "confusion.png"):
        assert_picture(run / name)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "metrics.jsonl", alone)
    with open(alone / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "ep')  # a run killed while appending
    r = cli("plot", alone)
    assert r.exit_code == 0, r.output
    assert "left out 1 unreadable line" in r.output
    assert sorted(p.name for p in alone.iterdir()) == ["curves.png", "metrics.jsonl"]
    assert_picture(alone / "curves.png")


def test_plot_on_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"Error: {tmp_path} is not a run folder (no metrics.jsonl)"]
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "nope")])
    assert r.output.strip() == f"Error: {tmp_path / 'nope'} does not exist"


def test_curves_of_a_baseline_log_written_by_hand(tmp_path):
    records = [{"kind": "step", "epoch": e, "step": 2 * e + s, "loss": 2.0, "ce": 2.0, "S": 0.0,
                "train_top1": 0.1 * s, "img_s": 100.0 + s, "lr": 0.1 / (e + 1)}
               for e in range(3) for s in (1, 2)]
    records += [{"kind": "epoch", "epoch": e, "step": 2 * e + 2, "train_ce": 2.0, "train_top1": 0.2,
                 "val": {"top1": 0.3, "f1_macro": None}} for e in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.plot_run(tmp_path) == [tmp_path / "curves.png"]
    assert_picture(tmp_path / "curves.png")
    # no policy: no objective panel and no mask panel, and no panel left empty
    assert_panels(plots.curves_figure(records), ["cross-entropy", "accuracy", "learning rates",
                                                 "throughput"])


def assert_panels(fig, titles):
    """The figure has exactly these panels, each with data, and every axis labelled (a right-hand
    axis has a label and data of its own)."""
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == titles
    for ax in fig.axes:
        drawn = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert drawn and all(len(line.get_xdata()) for line in drawn), f"empty: {ax.get_title()}"
        assert ax.get_ylabel(), f"no y label: {ax.get_title() or 'a right-hand axis'}"
    assert all(ax.get_xlabel() == "step" for ax in panels)


def test_curves_of_a_heated_run_have_every_panel_and_the_validation_loss(heated):
    out, _, _ = heated
    records, bad = plots.read_records(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert bad == 0 and len(epochs) == 2 and all(r["val"]["loss"] > 0 for r in epochs)
    fig = plots.curves_figure(records)
    assert_panels(fig, ["cross-entropy", "heated objective and S", "accuracy", "learning rates",
                        "throughput", "policy masks (gallery images)", "does the policy move?"])
    assert len(fig.axes) == 10  # three right-hand axes: S, the mask entropy, the policy's gradient
    (val,) = [line for line in fig.axes[0].lines if line.get_label() == "val CE"]
    assert list(val.get_ydata()) == [r["val"]["loss"] for r in epochs]


def test_validation_loss_is_the_mean_cross_entropy():
    import torch
    logits = np.random.default_rng(0).normal(size=(50, 7)) * 3
    labels = np.arange(50) % 7
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert mean_cross_entropy(logits, labels) == pytest.approx(float(want), rel=1e-12)


def test_without_matplotlib_or_tensorboard_training_goes_on_with_one_line_each(
        data, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    out = tmp_path / "run"
    r = cli("train", "--data", data, "--out", out, "--tensorboard", *SMALL, "--epochs", "1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert sum("matplotlib is not installed" in ln for ln in lines) == 1
    assert sum("tensorboard package is not installed" in ln for ln in lines) == 1
    assert not list(out.glob("*.png")) and not (out / "tensorboard").exists()
    assert (out / "per_class.csv").is_file() and (out / "masks.npz").is_file()
    assert "heated stage done" in r.output


def test_ctrl_c_prints_how_to_resume(data, tmp_path, ctrl_c_in_epoch):
    out = tmp_path / "run"
    ctrl_c_in_epoch(1)
    r = cli("train", "--data", data, "--out", out, "--no-policy", *SMALL)
    assert r.exit_code != 0
    assert f"interrupted: continue with  pgnm-fast train --no-policy --resume {out / 'last.pt'}" in r.output


def test_eval_writes_per_class_confusion_and_predictions(heated, tmp_path):
    out, _, _ = heated
    js, preds = tmp_path / "test.json", tmp_path / "pred.csv"
    r = cli("eval", "--checkpoint", out / "best.pt", "--json", js, "--predictions", preds, "-j", "0")
    assert r.exit_code == 0, r.output
    metrics = json.loads(js.read_text())
    with open(tmp_path / "test.per_class.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sum(int(r["support"]) for r in table) == metrics["n_images"]
    assert_picture(tmp_path / "test.confusion.png")
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n_images"]
    assert list(rows[0])[:5] == ["path", "label", "predicted", "top1", "top1_score"]
    assert all(r["predicted"] == r["top1"] for r in rows)
    top1 = np.mean([r["label"] == r["predicted"] for r in rows])
    assert top1 == pytest.approx(metrics["top1"])
    scores = np.array([[float(r[f"top{i}_score"]) for i in range(1, 6)] for r in rows])
    assert (np.diff(scores, axis=1) <= 0).all() and (scores.sum(1) <= 1 + 1e-6).all()
    assert all(r["path"].endswith(".png") for r in rows)
