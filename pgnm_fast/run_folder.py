"""A stage's run folder: checked fresh, locked while the stage writes, and what it holds.

``last.pt`` and ``best.pt`` (:func:`save_epoch_states`), ``metrics.jsonl`` (:class:`MetricsLog`)
and ``config.json`` (:func:`write_config`). Rank 0 alone writes here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from . import run_state
from .atomic import atomic_open, remove_stale_temporaries, write_error, write_json_atomic
from .config import TrainConfig
from .errors import ConfigError, OutputError
from .folders import lock_folder
from .provenance import run_record
from .run_state import RunState


def check_fresh(run_dir: Path, resume) -> None:
    """A folder that holds a run is continued with ``--resume``, never overwritten."""
    if resume is None and (run_dir / "last.pt").exists():
        raise ConfigError(f"run folder {run_dir} already holds a run (last.pt): continue it with "
                          f"--resume {run_dir / 'last.pt'} or choose another --out")


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, resume, is_main: bool):
    """Rank 0 locks the run folder (:mod:`pgnm_fast.folders`) and removes the temporaries of a
    killed checkpoint write; the other ranks hold nothing."""
    if not is_main:
        yield
        return
    with lock_folder(run_dir, "run folder"):
        check_fresh(run_dir, resume)  # another run may have finished here since the check
        remove_stale_temporaries(run_dir)
        yield


def write_config(run_dir: Path, cfg: TrainConfig, data_root: Path) -> None:
    """``config.json``: the run's settings, its data and what produced it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dict(dataclasses.asdict(cfg), data=str(data_root), run_record=run_record()),
                      run_dir / "config.json")


def save_epoch_states(state: RunState, out: Path, improved: bool,
                      write_record: Callable[[], None] = lambda: None) -> None:
    """The checkpoints of one epoch, in the order that keeps them consistent at any kill:
    ``best.pt`` when validation improved, the epoch's metrics record, then ``last.pt``. Until
    ``last.pt`` is replaced the run resumes at this epoch, replays it (bit for bit) and drops
    its record first (:meth:`MetricsLog.keep_until`); so ``best.pt`` never lags the best score
    ``last.pt`` records, and every saved epoch has its record. Nothing is written when the disk
    lacks room for the epoch's files (:func:`check_room`): a ``best.pt`` written without its
    ``last.pt`` would take the room the resumed run needs."""
    check_room(state, out, improved)
    if improved:
        run_state.save_run_state(state, out / "best.pt")
    write_record()
    run_state.save_run_state(state, out / "last.pt")


RECORD_ROOM = 1 << 20  # the epoch's metrics.jsonl record and the atomic writes' metadata


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in ``obj`` (dicts, lists and tuples walked)."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_room(state: RunState, out: Path, improved: bool) -> None:
    """Raise :class:`OutputError` naming ``last.pt`` when the file system of ``out`` has no room
    for this epoch's checkpoints: each is written beside the file it replaces, so ``best.pt``
    (when written) needs its size until the rename, then keeps what it grew by, and ``last.pt``
    needs its size again."""
    size = _tensor_bytes(state.to_dict()) + RECORD_ROOM
    best = out / "best.pt"
    old_best = best.stat().st_size if improved and best.is_file() else 0
    need = size + (max(size - old_best, 0) if improved else 0)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return  # the writes themselves report what is wrong with the folder
    if free < need:
        last = out / "last.pt"
        raise OutputError(f"{last}: cannot write (not enough free space: this epoch's "
                          f"checkpoints need {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are "
                          f"free); nothing of epoch {state.epoch} was written, the previous "
                          f"last.pt (if any) is unchanged: free some space and --resume {last}")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step and per epoch, appended and flushed."""

    def __init__(self, path: Path):
        self.path = path

    def keep_until(self, epoch: int) -> None:
        """Drop the records of epochs after ``epoch`` (a resumed run replays them), so the log
        holds each epoch once, as an uninterrupted run's does."""
        if not self.path.is_file():
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        keep = [ln for ln in lines if _record_epoch(ln) <= epoch]
        if len(keep) != len(lines):
            with atomic_open(self.path, "wb") as f:
                f.writelines(keep)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from None


def _record_epoch(line: bytes) -> int:
    """The (last) epoch a metrics.jsonl record belongs to; a line cut by a kill, or one that is
    no record (other bytes, not a JSON object, no integer epoch), counts as after every epoch
    (dropped)."""
    from .plots import parse_record
    record = parse_record(line)
    epochs = (record.get("epochs") or [record.get("epoch", -1)]) if record is not None else None
    if not isinstance(epochs, list) or not all(isinstance(e, int) for e in epochs):
        return 1 << 62
    return max(epochs)
