"""`pgnm-fast export` writes a model card (pgnm_fast.model_card) and no licence unless given."""
import json
import re

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from pgnm_fast.cli import main
from pgnm_fast.config import make_config
from pgnm_fast.models import create_model
from pgnm_fast.run_state import save_checkpoint

CLASSES = ["CT__abdomen__normal", "MR__knee__tear", "US__thyroid__nodule"]
VAL = {"top1": 0.625, "top5": 1.0, "balanced_accuracy": 0.5, "precision_macro": 0.4,
       "recall_macro": 0.5, "f1_macro": 0.4321, "roc_auc_ovo_macro": 0.75, "n_images": 48}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def checkpoint(tmp_path):
    model = create_model("resnet10t", len(CLASSES))
    cfg = make_config("finetune", model="resnet10t", epochs=4, val_crop_size=64, val_resize_size=73)
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"stage": "finetune", "epoch": 2, "step": 30, "model_name": "resnet10t",
                     "num_classes": len(CLASSES), "in_chans": 1, "classes": CLASSES,
                     "model": model.state_dict(), "config": vars(cfg) | {},
                     "data": "/data/hospital-ct-2024", "val_metrics": VAL}, path)
    return path


def test_card_describes_the_checkpoint(checkpoint, tmp_path):
    r = cli("export", checkpoint, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "README.md" in r.output
    assert "timm `resnet10t`" in card and "# resnet10t, 3 classes" in card
    assert all(f"`{c}`" in card for c in CLASSES)
    assert "grey (1 channel), 64 x 64 (resize 73" in card
    assert "`hospital-ct-2024`" in card and "/data/" not in card  # the folder's name, not its path
    assert "fine-tuned" in card and "Epochs: 3 of 4" in card
    assert "after epoch 3" in card and "| f1_macro | 0.4321 |" in card and "| n_images | 48 |" in card
    assert 'timm.create_model("local-dir:' in card
    assert ('pretrained_cfg_overlay=dict(file="path/to/this/folder/model.safetensors", num_classes=3, '
            'input_size=(1, 64, 64))') in card
    assert "data owner's terms" in card


def test_no_licence_unless_given(checkpoint, tmp_path):
    assert cli("export", checkpoint, "--out", tmp_path / "none").exit_code == 0
    config = json.loads((tmp_path / "none" / "config.json").read_text())
    card = (tmp_path / "none" / "README.md").read_text()
    assert "license" not in json.dumps(config)
    assert not re.search(r"^license:", card, flags=re.MULTILINE) and "No licence was given" in card

    assert cli("export", checkpoint, "--out", tmp_path / "cc", "--license", "CC-BY-NC-4.0").exit_code == 0
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    card = (tmp_path / "cc" / "README.md").read_text()
    assert config["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
    front = card.split("---\n")[1]
    assert "license: cc-by-nc-4.0" in front and "library_name: timm" in front
    assert "Released under `cc-by-nc-4.0`" in card and "data owner's terms" in card


def test_a_bad_licence_is_one_error_line_and_nothing_written(checkpoint, tmp_path):
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "bad"),
                                  "--license", "mine\nlicense: mit"])
    assert r.exit_code != 0
    assert r.output.strip().startswith("Error:") and "--license" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "bad").exists()


def test_torchscript_export_has_a_card_too(checkpoint, tmp_path):
    assert cli("export", checkpoint, "--out", tmp_path / "ts", "--format", "torchscript").exit_code == 0
    card = (tmp_path / "ts" / "README.md").read_text()
    assert 'torch.jit.load("model.pt")' in card and "| top1 | 0.6250 |" in card


def test_a_plain_state_dict_says_it_records_no_training(tmp_path):
    model = create_model("resnet10t", 4)
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    assert cli("export", tmp_path / "weights.safetensors", "--out", tmp_path / "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Exported from a plain state dict, which does not record how the weights were trained" in card
    assert "Validation metrics" not in card
    assert "`0`, `1`, `2`, `3`" in card
