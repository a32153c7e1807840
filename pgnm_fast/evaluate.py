"""`pgnm-fast eval`: a checkpoint's classifier on a split, scored with the metrics of docs/method.md §6."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_open
from .config import config_from_dict
from .distributed import init_distributed
from .engine import predict
from .errors import DataError
from .metrics import classification_metrics, json_safe
from .models import create_model
from .pipelines import make_loader
from .pipelines.sources import open_source
from .run_state import load_run_state
from .state_checks import load_weights


def evaluate_checkpoint(checkpoint, data=None, split="test", json_path=None, batch_size=None,
                        workers=None, device=None, amp=False, log=print, warn=print,
                        show_progress=True) -> dict:
    """Evaluate on clean images (no masks: the heated model is its classifier). Returns the
    metrics dict (keys :data:`pgnm_fast.metrics.METRIC_KEYS`)."""
    logits, labels, classes = predict_checkpoint(checkpoint, data, split, batch_size, workers,
                                                 device, amp, log, show_progress)
    metrics, absent = classification_metrics(logits, labels, classes)
    if absent:
        warn(f"warning: the {split} split lacks {len(absent)} of {len(classes)} classes "
             f"({', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}): macro metrics and "
             f"ROC-AUC are over the {len(classes) - len(absent)} classes present")
    if json_path is not None:
        write_json_atomic(json_safe(metrics), json_path)
    return metrics


def predict_checkpoint(checkpoint, data=None, split="test", batch_size=None, workers=None,
                       device=None, amp=False, log=print, show_progress=True):
    """``(logits, labels, classes)`` of a checkpoint's classifier over a split, in the split's
    order, labels as indices into the checkpoint's classes."""
    state = load_run_state(checkpoint)
    cfg = config_from_dict(state.config)
    root = Path(data) if data is not None else Path(state.data)
    source = open_source(root)
    if split not in source.splits:
        raise DataError(f"data at {root} has no {split!r} split (it has: {', '.join(source.splits)})")
    part = source.split(split)
    classes = list(state.classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({source.classes[i] for i in np.unique(part.labels)} - set(index))
    if unknown:
        raise DataError(f"the {split} split of {root} has classes the checkpoint {checkpoint} was not "
                        f"trained on: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    remap = np.array([index.get(name, -1) for name in source.classes], dtype=np.int64)
    info = init_distributed(device)
    model = create_model(state.model_name, len(classes), in_chans=state.in_chans)
    load_weights(model, state.model, f"checkpoint {checkpoint}")
    model.to(info.device)
    loader = make_loader(part, train=False, batch_size=batch_size or cfg.batch_size,
                         crop_size=cfg.val_crop_size, resize_size=cfg.val_resize_size,
                         channels=cfg.channels, workers=cfg.workers if workers is None else workers,
                         rank=0, world_size=1, device=info.device, log=log,
                         backend="torch" if cfg.loader == "torch" else "auto")
    logits, labels = predict(model, loader, info.device, amp=amp, show_progress=show_progress,
                            desc=f"eval {split}")
    return logits, remap[labels], classes


def write_json_atomic(obj, path) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
