"""Checkpoints: written atomically (never half-written), read with one clear error per failure."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_open
from .errors import CheckpointError
from .state_checks import check_finite, check_types, verify_integrity

FORMAT = "pgnm-fast/1"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash or Ctrl-C leaves the previous file intact."""
    buffer = io.BytesIO()  # serialised first: a failed file write is then an OSError naming
    torch.save(dict(state, format=FORMAT), buffer)  # the path, not torch's writer error
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a pgnm-fast checkpoint; a missing, truncated, foreign or unreadable file raises
    :class:`CheckpointError` naming it."""
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pgnm-fast checkpoint (no '{FORMAT}' format tag)")
    for key in ("model", "model_name", "classes", "stage", "epoch", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks '{key}': written by another tool or damaged")
    check_types(state, path)
    check_finite(state, path)
    return state
