"""compare's per-stage settings, equal lr per image, and starting both arms from given weights."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast import run_state as ckpt_io
from pgnm_fast.cli import main
from pgnm_fast.compare import check_lr, lr_per_image, stage_plan
from pgnm_fast.compare_settings import parse_stage_set, stage_sets
from pgnm_fast.config import make_config
from pgnm_fast.errors import ConfigError
from pgnm_fast.models import create_model
from pgnm_fast.synth import CLASSES, make_synthetic


def test_a_stage_setting_changes_its_stage_alone():
    sets = stage_sets(["heated.lr=0.0125", "baseline.epochs=5", "finetune.batch_size=8",
                       "heated.amp=true", "heated.policy_lr=none"], baseline_lr=0.0125)
    plan = stage_plan("tiny", {"epochs": 3, "grid": 8}, {"epochs": 1}, sets=sets)
    h, f, b = plan["heated"], plan["finetune"], plan["baseline"]
    assert (h.lr, h.epochs, h.amp, h.policy_lr, h.grid) == (0.0125, 3, True, None, 8)
    assert (b.lr, b.epochs, b.amp) == (0.0125, 5, False)
    assert (f.lr, f.batch_size, f.epochs) == (make_config("finetune").lr, 8, 1)
    assert plan["overrides"]["baseline"] == {"epochs": 5, "lr": 0.0125}
    assert plan["overrides"]["heated"]["lr"] == 0.0125
    assert check_lr(plan, False)["heated"] == pytest.approx(0.0125 / 32)
    matched = stage_plan("tiny", {"epochs": 3}, {"epochs": 2}, True, stage_sets(["heated.epochs=4"]))
    assert matched["baseline"].epochs == 6  # --match-budget: heated 4 + fine-tune 2
    with pytest.raises(ConfigError, match="--match-budget sets the baseline's epochs"):
        stage_plan("tiny", {}, {}, True, stage_sets(["baseline.epochs=4"]))


@pytest.mark.parametrize("entry, said", [
    ("heated.lr", "write STAGE.SETTING=VALUE"),
    ("warm.lr=1", "no stage 'warm'"),
    ("heated.speed=1", "'speed' is not a setting"),
    ("heated.lr=fast", "lr takes a number (float), not 'fast'"),
    ("heated.lr=-1", "heated.lr=-1: lr must be positive"),
    ("baseline.batch_size=1", "batch_size must be at least 2"),
    ("baseline.grid=8", "the baseline stage has none"),
    ("finetune.model=resnet18", "the fine-tune keeps the heated classifier"),
    ("heated.seed=3", "--seed and --seeds set it"),
    ("heated.opt=adam", "opt must be one of"),
    ("heated.amp=maybe", "amp is a switch"),
])
def test_a_bad_stage_setting_is_one_line_naming_it(entry, said):
    with pytest.raises(ConfigError, match=None) as e:
        parse_stage_set(entry)
    assert said in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="disagree"):
        stage_sets(["heated.lr=0.1"], heated_lr=0.2)


def test_unequal_lr_per_image_is_refused_unless_allowed():
    plan = stage_plan("tiny", {}, {}, sets=stage_sets(heated_lr=0.05))
    with pytest.raises(ConfigError, match="different lr per image.*--allow-unequal-lr"):
        check_lr(plan, False)
    assert check_lr(plan, True)["baseline"] == pytest.approx(0.1 / 256)  # the authors' per image
    # the same lr per image at another global batch is equal
    same = stage_plan("tiny", {}, {}, sets=stage_sets(["heated.lr=0.00625", "heated.global_batch=16"]))
    assert lr_per_image(same["heated"]) == lr_per_image(same["baseline"])
    check_lr(same, False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=240, seed=13, size=40)


def _start(tmp_path, seed):
    """A timm folder (as `export` writes it) of a random resnet10t on the default 13 classes."""
    torch.manual_seed(seed)
    model = create_model("resnet10t", len(CLASSES))
    cfg = make_config("baseline", "tiny")
    ckpt = tmp_path / f"start-{seed}" / "best.pt"
    ckpt_io.save_checkpoint({"stage": "baseline", "epoch": 0, "model_name": "resnet10t",
                             "classes": list(CLASSES), "in_chans": 1,
                             "model": model.state_dict(), "config": dataclasses.asdict(cfg)}, ckpt)
    folder = tmp_path / f"export-{seed}"
    r = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(folder)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return folder, model.state_dict()


FAST = ["--epochs", "1", "--finetune-epochs", "1", "-b", "16", "-j", "0", "--grid", "8",
        "--resamples", "50"]


@pytest.mark.slow
def test_compare_from_initial_checkpoint_with_stage_settings(data, tmp_path):
    start, weights = _start(tmp_path, 5)
    out = tmp_path / "cmp"
    base = ["compare", "--data", str(data), "--out", str(out), *FAST]
    r = CliRunner().invoke(main, base + ["--heated-lr", "1e-9"])
    assert r.exit_code != 0 and "different lr per image" in r.output, r.output
    assert r.output.count("Error:") == 1 and not out.exists()
    args = base + ["--initial-checkpoint", str(start), "--heated-lr", "1e-9",
                   "--stage-set", "baseline.lr=1e-9", "--stage-set", "finetune.lr=0.02"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "compare.json").read_text())
    from pgnm_fast.transfer import weights_sha256
    assert report["initial_checkpoint"] == {"path": str(start.resolve()),
                                            "sha256": weights_sha256(start)}
    assert report["stage_settings"] == {"heated": {"lr": 1e-9}, "finetune": {"lr": 0.02},
                                        "baseline": {"lr": 1e-9}}
    assert report["arms_differ_in_lr"] is False
    assert report["lr_per_image"]["finetune"] == pytest.approx(0.02 / 32)  # tiny's global batch
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["stage_settings"] == report["stage_settings"]
    assert f"both arms start from {start.resolve()}" in r.output
    # both arms started from the weights: at lr 1e-9 their convolutions are still those
    for stage in ("heated", "baseline"):
        state = ckpt_io.load_run_state(out / "seed-0" / stage / "last.pt")
        assert state.config["lr"] == 1e-9
        for key in ("conv1.0.weight", "layer2.0.conv1.weight"):
            assert torch.allclose(state.model[key], weights[key], atol=1e-6), (stage, key)
    ft = ckpt_io.load_run_state(out / "seed-0" / "finetune" / "last.pt")
    assert ft.config["lr"] == 0.02
    # the same command reuses every stage; other starting weights, or none, are refused
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("already finished") == 3, again.output
    other, _ = _start(tmp_path, 6)
    for swap in ([str(other) if x == str(start) else x for x in args],
                 [x for x in args if x not in ("--initial-checkpoint", str(start))]):
        r = CliRunner().invoke(main, swap)
        assert r.exit_code != 0 and "made from the weights" in r.output, r.output
        assert r.output.count("Error:") == 1 and "Traceback" not in r.output


def test_start_settings_are_those_a_stage_from_the_weights_takes(tmp_path):
    """What compare expects of a stage started from weights is what the stage records, for a
    timm folder and for a pgnm-fast checkpoint with its own normalisation and a 3-channel stem."""
    from pgnm_fast.compare_settings import start_overrides
    from pgnm_fast.prepare import _config
    from pgnm_fast.weights import read_weights
    folder, _ = _start(tmp_path, 1)
    torch.manual_seed(2)
    model = create_model("resnet10t", len(CLASSES), in_chans=3)
    cfg = make_config("baseline", "tiny", channels=3, mean=0.3, std=0.2)
    ckpt = tmp_path / "three" / "best.pt"
    ckpt_io.save_checkpoint({"stage": "baseline", "epoch": 0, "model_name": "resnet10t",
                             "classes": list(CLASSES), "in_chans": 3,
                             "model": model.state_dict(), "config": dataclasses.asdict(cfg)}, ckpt)
    for path, given in ((folder, {}), (ckpt, {}), (ckpt, {"channels": 1, "model": None})):
        w = read_weights(path)
        for stage in ("heated", "baseline"):
            expected = make_config(stage, "tiny", **start_overrides(w, given))
            assert expected == _config(stage, "tiny", dict(given), None, None, w), (path, stage)
    assert make_config("heated", "tiny", **start_overrides(read_weights(ckpt), {})).mean == 0.3
