"""Checkpoints are atomic and every broken file gets one clear CheckpointError."""
import pytest
import torch

from pgnm_fast.errors import CheckpointError
from pgnm_fast.run_state import load_checkpoint, save_checkpoint


def _state():
    return {"model": {"w": torch.randn(3, 4)}, "model_name": "resnet10t", "classes": ["a", "b"],
            "stage": "heated", "epoch": 2, "config": {"lr": 0.1}}


def test_round_trip(tmp_path):
    s = _state()
    save_checkpoint(s, tmp_path / "last.pt")
    back = load_checkpoint(tmp_path / "last.pt")
    torch.testing.assert_close(back["model"]["w"], s["model"]["w"])
    assert back["classes"] == ["a", "b"] and back["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "foreign", "directory"])
def test_bad_checkpoints_raise_one_clear_error(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    if damage != "missing":
        save_checkpoint(_state(), path)
    data = path.read_bytes() if path.exists() else b""
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x89PNG not a checkpoint" * 10)
    elif damage == "foreign":
        torch.save({"state_dict": {}}, path)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
