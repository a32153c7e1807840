"""A run's state: what a checkpoint holds (:class:`RunState`), saving it atomically, reading it back
with one clear error per failure, and whether the run is finished.

On disk a checkpoint is the dict of :meth:`RunState.to_dict` saved by ``torch.save`` with the
format tag ``"pgnm-fast/1"``; the keys are those of the record's fields (optional ones only when
set), so run folders written by earlier versions load unchanged.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_open
from .errors import CheckpointError
from .state_checks import check_finite, check_types, verify_integrity

FORMAT = "pgnm-fast/1"
REQUIRED = ("model", "model_name", "classes", "stage", "epoch", "config")


@dataclasses.dataclass
class RunState:
    """One checkpoint (``last.pt``, ``best.pt``, ``averaged.pt``) of a stage."""
    stage: str
    epoch: int                      # the last finished epoch (0-based)
    model_name: str
    classes: list
    model: dict                     # the classifier's state dict
    config: dict                    # the TrainConfig as a dict
    step: int = 0
    num_classes: int | None = None
    in_chans: int = 1
    optimizer: dict | None = None
    data: str | None = None
    best_f1: float = float("-inf")
    val_metrics: dict | None = None
    rng: torch.Tensor | None = None
    # heated stage
    policy: dict | None = None
    policy_model: str | None = None
    masker: dict | None = None
    policy_optimizer: dict | None = None
    # --average-last
    averaged: dict | None = None          # the running average (in last.pt)
    averaged_epochs: list | None = None   # the epochs averaged (in averaged.pt)
    extra: dict = dataclasses.field(default_factory=dict)  # keys this version does not know

    @property
    def is_finished(self) -> bool:
        """True when every epoch of the run's config is done."""
        return self.epoch + 1 >= self.config["epochs"]

    def to_dict(self) -> dict:
        """The on-disk layout: one key per field set (None fields are left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        return dict(self.extra, **out)

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in state.items() if k in names}
        extra = {k: v for k, v in state.items() if k not in names and k != "format"}
        return cls(**known, extra=extra)


def save_run_state(state: RunState | dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash or Ctrl-C leaves the previous file intact.
    Every checkpoint the stages write goes through here."""
    payload = state.to_dict() if isinstance(state, RunState) else dict(state)
    buffer = io.BytesIO()  # serialised first: a failed file write is then an OSError naming
    torch.save(dict(payload, format=FORMAT), buffer)  # the path, not torch's writer error
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())
    return Path(path)


def load_run_state(path: str | os.PathLike, map_location: Any = "cpu") -> RunState:
    """Read a pgnm-fast checkpoint as a :class:`RunState` (see :func:`load_checkpoint`)."""
    return RunState.from_dict(load_checkpoint(path, map_location))


def save_checkpoint(state: RunState | dict, path: str | os.PathLike) -> Path:
    """:func:`save_run_state` (the name kept for callers of the dict interface)."""
    return save_run_state(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a pgnm-fast checkpoint as its dict; a missing, truncated, foreign or unreadable file
    raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    verify_integrity(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, AttributeError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({reason[:160]})") from None
    return check_checkpoint(state, path)


def check_checkpoint(state: Any, path: str | os.PathLike) -> dict:
    """``state`` (a loaded file, its integrity verified) as a pgnm-fast checkpoint: its format
    tag, keys, metadata types and finite weights, else :class:`CheckpointError` naming ``path``."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pgnm-fast checkpoint (no '{FORMAT}' format tag)")
    for key in REQUIRED:
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks '{key}': written by another tool or damaged")
    check_types(state, path)
    check_finite(state, path)
    return state
