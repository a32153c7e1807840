"""Damaged or foreign input, probed through the CLI as a user meets it: weights in every form,
model folders' config.json, the authors' files, transfer.json and a run folder's own files
(metrics.jsonl, confusion.csv, masks.npz, the checkpoints themselves).

Each row names an input maker and what the line must say. A refused input ends in exactly one
``Error:`` line naming the file and the key, no traceback, nothing written; a damaged file that
only feeds a picture is left out of that picture with one line, and the command goes on.
"""
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_edits import EDITS
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from test_user_errors import TINY, digest, refused

from pgnm_fast.cli import main
from pgnm_fast.models import create_model
from pgnm_fast.run_state import load_checkpoint
from pgnm_fast.synth import make_synthetic


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def clean(result, code=0):
    """The command ended with ``code`` and no traceback; returns its output."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("d") / "rin", images=52, seed=1, size=24)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished one-epoch baseline run (copied before each change)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(data), "--out", str(out),
                                  *TINY], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def _state(num_classes=13) -> dict:
    return create_model("resnet10t", num_classes, in_chans=1).state_dict()


# ----------------------------------------------------------------------------- weights files
def fc_bias_wrong(tmp):
    state = _state()
    state["fc.bias"] = torch.zeros(5)
    save_file(state, tmp / "fc_bias_wrong.safetensors")
    return tmp / "fc_bias_wrong.safetensors"


def fc_weight_wrong(tmp):
    state = _state()
    state["fc.weight"] = torch.zeros(13, 7)
    torch.save(state, tmp / "fc_weight_wrong.pth")
    return tmp / "fc_weight_wrong.pth"


def _folder(tmp, config) -> Path:
    folder = tmp / "hf"
    folder.mkdir()
    save_file(_state(), folder / "model.safetensors")
    (folder / "config.json").write_text(config)
    return folder


def config_list(tmp):
    return _folder(tmp, "[]")


def config_pretrained_cfg_list(tmp):
    return _folder(tmp, json.dumps({"architecture": "resnet10t", "pretrained_cfg": []}))


def config_labels_not_list(tmp):
    return _folder(tmp, json.dumps({"architecture": "resnet10t", "label_names": 3}))


def config_label_count(tmp):
    return _folder(tmp, json.dumps({"architecture": "resnet10t", "label_names": ["a"]}))


def authors_strings(tmp):
    torch.save({"model": {k: "x" for k in _state()}}, tmp / "authors_strings.pth")
    return tmp / "authors_strings.pth"


def authors_int_keys(tmp):
    torch.save({"model": dict(enumerate(_state().values()))}, tmp / "authors_ints.pth")
    return tmp / "authors_ints.pth"


def authors_policy_strings(tmp):
    torch.save({"model": _state(), "policy_net": {"a": "b"}}, tmp / "authors_policy.pth")
    return tmp / "authors_policy.pth"


def authors_base_strings(tmp):
    from pgnm_fast.models import PolicyNet
    policy = PolicyNet(grid=4, in_chans=1).state_dict()
    torch.save({"model": _state(), "policy_net": policy, "base_alpha": "x", "base_beta": "y"},
               tmp / "authors_base.pth")
    return tmp / "authors_base.pth"


def text_file(tmp):
    (tmp / "notes.pth").write_text("these are my notes\n")
    return tmp / "notes.pth"


def png_file(tmp):
    Image.new("L", (8, 8)).save(tmp / "image.pth", format="PNG")
    return tmp / "image.pth"


def empty_file(tmp):
    (tmp / "empty.safetensors").write_bytes(b"")
    return tmp / "empty.safetensors"


def zip_file(tmp):
    with zipfile.ZipFile(tmp / "archive.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    return tmp / "archive.pt"


def nan_safetensors(tmp):
    state = _state()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, tmp / "nan.safetensors")
    return tmp / "nan.safetensors"


WEIGHTS = [  # (maker, what the line names besides the file)
    (fc_bias_wrong, ["fc.bias", "(13,)"]),
    (fc_weight_wrong, ["fc.weight", "512"]),
    (config_list, ["config.json", "object"]),
    (config_pretrained_cfg_list, ["config.json", "'pretrained_cfg'", "object"]),
    (config_labels_not_list, ["config.json", "'label_names'", "list"]),
    (config_label_count, ["config.json", "1 label name", "13 classes"]),
    (authors_strings, ["'model'", "str"]),
    (authors_int_keys, ["'model'", "int"]),
    (authors_policy_strings, ["'policy_net'", "str"]),
    (authors_base_strings, ["'base_alpha'", "str"]),
    (text_file, ["text"]),
    (png_file, ["PNG image"]),
    (empty_file, ["empty"]),
    (zip_file, ["zip", "not a PyTorch"]),
    (nan_safetensors, ["layer1.0.conv1.weight", "not finite"]),
]
COMMANDS = ["train", "eval", "export"]


def _use(command, path, data, tmp):
    if command == "train":
        return ["train", "--no-policy", "--initial-checkpoint", path, "--data", data,
                "--out", tmp / "out", *TINY]
    if command == "eval":
        return ["eval", "--checkpoint", path, "--data", data, "--model", "resnet10t", "-j", "0"]
    return ["export", path, "--out", tmp / "out"]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("make,needles", WEIGHTS, ids=[m.__name__ for m, _ in WEIGHTS])
def test_weights_probe(data, tmp_path, make, needles, command):
    path = make(tmp_path)
    named = path / "config.json" if "config.json" in needles else path
    refused(_use(command, path, data, tmp_path), named, *needles[1:] if named != path else needles,
            untouched=[tmp_path])
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_load_for_inspection_but_are_never_exported(data, tmp_path):
    path = nan_safetensors(tmp_path)
    env = {"PGNM_FAST_ALLOW_NONFINITE_WEIGHTS": "1"}
    out = clean(cli("eval", "--checkpoint", path, "--data", data, "--model", "resnet10t",
                    "-j", "0", env=env), code=3)  # loaded; its outputs are NaN
    assert "not finite" in out or "NaN" in out
    r = cli("export", path, "--out", tmp_path / "out", env=env)
    assert r.exit_code == 2 and "layer1.0.conv1.weight" in r.output, r.output
    assert not (tmp_path / "out").exists()
    # the same through the flag, given before the command
    out = clean(cli("--allow-nonfinite-weights", "eval", "--checkpoint", path, "--data", data,
                    "--model", "resnet10t", "-j", "0", env={"PGNM_FAST_ALLOW_NONFINITE_WEIGHTS": ""}),
                code=3)
    assert "not finite" in out or "NaN" in out


# ----------------------------------------------------------------------------- transfer.json
def test_a_transfer_json_whose_settings_is_a_list(data, run, tmp_path):
    out = tmp_path / "tr"
    out.mkdir()
    (out / "transfer.json").write_text(json.dumps({"settings": [], "runs": []}))
    refused(["transfer", "--from", run / "last.pt", "--data", data, "--out", out, "--shots", "13",
             "--repeats", "1", "--steps", "1", "-j", "0"],
            out / "transfer.json", "'settings'", "object", untouched=[out])


# ----------------------------------------------------------------------------- run files
def bad_bytes(folder):
    with open(folder / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "note", "text": "\xff\xfe"}\n')
    return "metrics.jsonl"


def list_line(folder):
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    return "metrics.jsonl"


def empty_confusion(folder):
    (folder / "confusion.csv").write_text("")
    return "confusion.csv"


def truncated_confusion(folder):
    text = (folder / "confusion.csv").read_text()
    (folder / "confusion.csv").write_text(text[:len(text) * 2 // 3])
    return "confusion.csv"


def truncated_masks(folder):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((2, 8, 8), np.float32))
    (folder / "masks.npz").write_bytes(buffer.getvalue()[:100])
    return "masks.npz"


RUN_FILES = [bad_bytes, list_line, empty_confusion, truncated_confusion, truncated_masks]


@pytest.mark.parametrize("damage", RUN_FILES, ids=[d.__name__ for d in RUN_FILES])
def test_plot_leaves_a_damaged_file_out_in_one_line(run, tmp_path, damage):
    copy = shutil.copytree(run, tmp_path / "run")
    name = damage(copy)
    out = clean(cli("plot", copy))
    assert (copy / "curves.png").is_file()
    lines = [ln for ln in out.splitlines() if name in ln]
    assert len(lines) == 1, out


@pytest.mark.slow
@pytest.mark.parametrize("damage", RUN_FILES, ids=[d.__name__ for d in RUN_FILES])
def test_resume_is_not_stopped_by_a_damaged_picture_file(run, tmp_path, damage):
    copy = shutil.copytree(run, tmp_path / "run")
    damage(copy)
    clean(cli("train", "--no-policy", "--resume", copy / "last.pt", "--epochs", "2"))
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- checkpoints
def test_resume_through_a_symlink_names_the_run_folder(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    link = tmp_path / "link.pt"
    link.symlink_to(copy / "last.pt")
    out = clean(cli("train", "--no-policy", "--resume", link, "--epochs", "2"))
    assert str(copy / "best.pt") in out or str(copy / "last.pt") in out
    assert str(tmp_path / "best.pt") not in out
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1
    assert not (tmp_path / "metrics.jsonl").exists()


def test_room_for_one_checkpoint_stops_before_writing_and_keeps_the_run_resumable(
        run, tmp_path, monkeypatch):
    """A disk that takes one more checkpoint file: its free space says so, and a second
    checkpoint write fails with ENOSPC."""
    import errno
    from contextlib import contextmanager

    import pgnm_fast.run_state as run_state
    from pgnm_fast.atomic import write_error
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "best.pt").unlink()
    state = torch.load(copy / "last.pt", weights_only=True)
    run_state.save_checkpoint(dict(state, best_f1=float("-inf")), copy / "last.pt")  # the
    # next epoch improves: it writes best.pt and last.pt
    size = (copy / "last.pt").stat().st_size
    real_usage, real_open, written = shutil.disk_usage, run_state.atomic_open, []

    @contextmanager
    def one_file_of_room(path, mode="wb"):
        if written:
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        with real_open(path, mode) as f:
            yield f
        written.append(path)

    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=size + size // 2))
    monkeypatch.setattr(run_state, "atomic_open", one_file_of_room)
    refused(["train", "--no-policy", "--resume", copy / "last.pt", "--epochs", "2"],
            copy / "last.pt", "free", untouched=[copy / "last.pt"])
    assert not (copy / "best.pt").exists()
    monkeypatch.undo()
    clean(cli("train", "--no-policy", "--resume", copy / "last.pt", "--epochs", "2"))
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1


def test_digest_sees_every_file(tmp_path):
    """The probes' 'nothing written' check can fail: a new file changes the digest."""
    before = digest(tmp_path)
    (tmp_path / "x").write_text("x")
    assert digest(tmp_path) != before
    assert os.path.exists(tmp_path / "x")


def test_a_checkpoint_whose_class_names_do_not_match_its_head(run, tmp_path):
    from pgnm_fast.run_state import save_checkpoint
    state = torch.load(run / "last.pt", weights_only=True)
    bad = save_checkpoint(dict(state, classes=["only"]), tmp_path / "c" / "last.pt")
    for args in (["eval", "--checkpoint", bad, "-j", "0"], ["export", bad, "--out", tmp_path / "o"]):
        refused(args, bad, "'classes' names 1", "13 classes", untouched=[tmp_path])


# ----------------------------------------------------------------------------- transfer's starts
@pytest.mark.parametrize("twice", ["label", "file"])
def test_transfer_refuses_a_start_given_twice(data, run, tmp_path, twice):
    """Two checkpoints under one label, or one file twice, would merge into one arm."""
    other = tmp_path / "other.pt"
    shutil.copy(run / "best.pt", other)
    starts = (["--from", run / "last.pt", "--label", "a", "--from", other, "--label", "a"]
              if twice == "label" else ["--from", run / "last.pt", "--from", run / "last.pt"])
    refused(["transfer", *starts, "--data", data, "--out", tmp_path / "tr", "--shots", "13",
             "--repeats", "1", "--steps", "1", "-j", "0"], "--from", untouched=[tmp_path])
    assert not (tmp_path / "tr").exists()


# ----------------------------------------------------------------------------- a packed cache
@pytest.fixture(scope="module")
def packed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "cache"
    clean(cli("pack", "--data", data, "--out", out, "-j", "0"))
    return out


@pytest.mark.parametrize("loader", ["torch", "device"])
@pytest.mark.parametrize("edit", EDITS)
def test_train_from_a_cache_edited_after_pack_stops_in_one_line(packed, tmp_path, edit, loader):
    cache = Path(shutil.copytree(packed, tmp_path / "cache"))  # times kept: still sealed
    EDITS[edit][0](cache)
    refused(["train", "--no-policy", "--data", cache, "--out", tmp_path / "run", *TINY,
             "--loader", loader], "pack --verify", untouched=[cache])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- numeric flags
@pytest.mark.parametrize("args,flag", [
    (["transfer", "--lr", "nan"], "--lr"),
    (["transfer", "--steps", "0"], "--steps"),
    (["transfer", "--repeats", "-1"], "--repeats"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["compare", "--seeds", "0"], "--seeds"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_number_out_of_range_is_refused_before_anything_runs(data, run, tmp_path, args, flag):
    needed = {"transfer": ["--from", run / "last.pt", "--data", data],
              "train": ["--data", data], "eval": ["--checkpoint", run / "last.pt"],
              "compare": ["--data", data]}[args[0]]
    refused([*args, *needed, "--out" if args[0] != "eval" else "--json",
             tmp_path / ("o" if args[0] != "eval" else "o.json")], flag, untouched=[tmp_path])


@pytest.mark.parametrize("command", ["train", "compare", "transfer", "synth", "export"])
def test_an_empty_out_is_refused(data, run, tmp_path, command):
    needed = {"transfer": ["--from", run / "last.pt", "--data", data], "train": ["--data", data],
              "compare": ["--data", data], "synth": [], "export": [run / "last.pt"]}[command]
    here = sorted(os.listdir())  # an empty --out would have meant the current folder
    refused([command, *needed, "--out", ""], "--out", untouched=[tmp_path])
    assert sorted(os.listdir()) == here
