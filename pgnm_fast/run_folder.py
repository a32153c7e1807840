"""A stage's run folder: checked fresh, locked while the stage writes, and what it holds.

``last.pt`` and ``best.pt`` (:func:`save_epoch_states`), ``metrics.jsonl`` (:class:`MetricsLog`)
and ``config.json`` (:func:`write_config`). Rank 0 alone writes here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_open, remove_stale_temporaries, write_error, write_json_atomic
from .config import TrainConfig
from .errors import ConfigError
from .folders import lock_folder
from .provenance import run_record
from .run_state import RunState, save_run_state


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
    ``last.pt`` records, and every saved epoch has its record."""
    if improved:
        save_run_state(state, out / "best.pt")
    write_record()
    save_run_state(state, out / "last.pt")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step and per epoch, appended and flushed."""

    def __init__(self, path: Path):
        self.path = path

    def keep_until(self, epoch: int) -> None:
        """Drop the records of epochs after ``epoch`` (a resumed run replays them), so the log
        holds each epoch once, as an uninterrupted run's does."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if _record_epoch(ln) <= epoch]
        if len(keep) != len(lines):
            with atomic_open(self.path, "w") as f:
                f.writelines(keep)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from None


def _record_epoch(line: str) -> int:
    """The (last) epoch a metrics.jsonl record belongs to; a line cut by a kill counts as after
    every epoch (dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return 1 << 62
    return max(record.get("epochs") or [record.get("epoch", -1)])
