"""A run's state: what a checkpoint holds (:class:`RunState`), the one reader and writer of the
checkpoint format.

On disk a checkpoint is the dict of :meth:`RunState.to_dict` saved by ``torch.save`` with the
format tag ``"pgnm-fast/1"``; the keys are those of the record's fields (optional ones only when
set), so run folders written by earlier versions load unchanged. The record is made from a
stage's modules (:meth:`RunState.capture`), loaded back into them (:meth:`RunState.restore`) and
turned into the weight average's record (:meth:`RunState.average`); its settings read as a
:class:`~pgnm_fast.config.TrainConfig` (:attr:`RunState.train_config`).

A file read back is checked, one line naming it per failure: every record of the zip archive
``torch.save`` writes against its CRC-32 (which ``torch.load`` does not check: a flipped byte in
a weight is found here), the format tag and keys, the types of the metadata the stages read, and
finite weights (a diverged run's weights are refused by ``eval``, ``--resume`` and
``finetune --from``).
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
from .config import STAGES, TrainConfig, config_from_dict
from .errors import CheckpointError, first_line
from .metrics import json_safe
from .state_checks import load_weights

FORMAT = "pgnm-fast/1"
REQUIRED = ("model", "model_name", "classes", "stage", "epoch", "config")
NOT_STORED = ("extra", "source")  # fields that are not keys of the file


@dataclasses.dataclass
class RunState:
    """One checkpoint (``last.pt``, ``best.pt``, ``averaged.pt``) of a stage."""
    stage: str
    epoch: int                      # the last finished epoch (0-based)
    model_name: str
    classes: list
    model: dict                     # the classifier's state dict
    config: dict                    # the TrainConfig as stored (train_config reads it)
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
    source: Path | None = None            # the file it was read from (not stored)

    @property
    def train_config(self) -> TrainConfig:
        """The run's settings (keys this version does not know left out, missing ones at their
        defaults)."""
        return config_from_dict(self.config)

    @property
    def is_finished(self) -> bool:
        """True when every epoch of the run's config is done."""
        return self.epoch + 1 >= self.config["epochs"]

    def to_dict(self) -> dict:
        """The on-disk layout: one key per field set (None fields are left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in NOT_STORED and getattr(self, f.name) is not None}
        return dict(self.extra, **out)

    @classmethod
    def from_dict(cls, state: dict, source: Path | None = None) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)} - set(NOT_STORED)
        known = {k: v for k, v in state.items() if k in names}
        extra = {k: v for k, v in state.items() if k not in names and k != "format"}
        return cls(**known, extra=extra, source=source)

    @classmethod
    def capture(cls, cfg: TrainConfig, classes: list, data, *, epoch: int, step: int,
                best_f1: float, val_metrics: dict, model, optimizer, policy=None, masker=None,
                policy_optimizer=None) -> RunState:
        """The state of a stage at the end of ``epoch``: its (unwrapped) modules, optimisers,
        the masker's stream and torch's CPU random state."""
        state = cls(stage=cfg.stage, epoch=epoch, step=step, model_name=cfg.model,
                    num_classes=len(classes), in_chans=cfg.channels, classes=list(classes),
                    model=model.state_dict(), optimizer=optimizer.state_dict(),
                    config=dataclasses.asdict(cfg), data=str(data), best_f1=best_f1,
                    val_metrics=json_safe(val_metrics), rng=torch.get_rng_state())
        if policy is not None:
            state.policy, state.policy_model = policy.state_dict(), cfg.policy_model
            state.masker = masker.state_dict()
            state.policy_optimizer = policy_optimizer.state_dict()
        return state

    def restore(self, model, optimizer, policy=None, masker=None, policy_optimizer=None, *,
                impl: str | None = None, rng: bool = True) -> None:
        """Load the weights, the optimisers' state (momentum buffers), the masker's stream when
        it ran the same ``impl``, and (``rng``) torch's CPU random state into a stage's
        (unwrapped) modules. The optimisers keep the hyper-parameters they were built with."""
        load_weights(model, self.model, "the --resume checkpoint")
        optimizer.load_state_dict(self.optimizer)
        if policy is not None:
            load_weights(policy, self.policy, "the --resume checkpoint", "policy")
            if self.config.get("impl") == impl:  # same implementation: continue its mask stream
                masker.load_state_dict(self.masker)
            policy_optimizer.load_state_dict(self.policy_optimizer)
        if rng:
            torch.set_rng_state(self.rng)

    def average(self, model_state: dict, epochs: list, val_metrics: dict) -> RunState:
        """The record of ``averaged.pt``: this state with the averaged weights of ``epochs``
        and their validation metrics, nothing to resume from."""
        return dataclasses.replace(self, optimizer=None, averaged=None, rng=None,
                                   model=model_state, averaged_epochs=list(epochs),
                                   val_metrics=json_safe(val_metrics))


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
    return RunState.from_dict(load_checkpoint(path, map_location), Path(path))


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
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({first_line(e)[:160]})") from None
    return check_checkpoint(state, path)


def is_run_state(obj: Any) -> bool:
    """Whether a loaded file is a pgnm-fast checkpoint (its format tag)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def run_state_from(obj: dict, path: str | os.PathLike) -> RunState:
    """A file already loaded (another reader found the format tag) as a checked :class:`RunState`."""
    verify_integrity(path)
    return RunState.from_dict(check_checkpoint(obj, path), Path(path))


def check_checkpoint(state: Any, path: str | os.PathLike) -> dict:
    """``state`` (a loaded file, its integrity verified) as a pgnm-fast checkpoint: its format
    tag, keys, metadata types and finite weights, else :class:`CheckpointError` naming ``path``."""
    if not is_run_state(state):
        raise CheckpointError(f"{path} is not a pgnm-fast checkpoint (no '{FORMAT}' format tag)")
    for key in REQUIRED:
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks '{key}': written by another tool or damaged")
    check_types(state, path)
    check_finite(state, path)
    return state


def verify_integrity(path) -> None:
    """Raise :class:`CheckpointError` if a record of the zip archive at ``path`` does not match
    its CRC-32 (the file was damaged after it was written)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its record {bad} does not match its "
                              f"checksum (the file changed after it was written)")


def _state_dict_ok(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def check_types(state: dict, path) -> None:
    """The fields every stage reads, with the types it reads them as."""
    classes = state.get("classes")
    checks = [
        ("stage", state.get("stage") in STAGES, f"one of {', '.join(STAGES)}"),
        ("epoch", isinstance(state.get("epoch"), int) and state["epoch"] >= 0,
         "a non-negative integer"),
        ("model_name", isinstance(state.get("model_name"), str), "a model name"),
        ("classes", isinstance(classes, (list, tuple)) and len(classes) > 0
         and all(isinstance(c, str) for c in classes), "a list of class names"),
        ("config", isinstance(state.get("config"), dict), "a dict of settings"),
        ("model", _state_dict_ok(state.get("model")), "a dict of tensors"),
    ]
    if "policy" in state:
        checks.append(("policy", _state_dict_ok(state["policy"]), "a dict of tensors"))
    if "best_f1" in state:
        checks.append(("best_f1", isinstance(state["best_f1"], (int, float)), "a number"))
    for key, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"checkpoint {path}: '{key}' is not {expected} (written by "
                                  f"another tool or damaged)")


def check_finite(state: dict, path) -> None:
    """Raise :class:`CheckpointError` naming the first weight with a NaN or infinite value."""
    for part in ("model", "policy"):
        for name, tensor in (state.get(part) or {}).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"checkpoint {path}: {part} weight {name} is not finite "
                                      f"(NaN or inf: saved from a diverged run); use an earlier "
                                      f"checkpoint")
