"""`pgnm-fast eval`: a checkpoint's classifier on a split, scored with the metrics of docs/method.md §6."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .atomic import atomic_open, write_json_atomic
from .config import TrainConfig
from .distributed import init_distributed
from .engine import predict
from .errors import DataError
from .metrics import classification_metrics, json_safe, per_class_metrics, reported_metrics
from .models import create_model
from .pipelines import make_loader
from .pipelines.sources import open_source
from .weights import fit_classifier, read_weights, resolve_model


def evaluate_checkpoint(checkpoint, data=None, split="test", json_path=None, batch_size=None,
                        workers=None, device=None, amp=False, log=print, warn=print,
                        show_progress=True, predictions_path=None, model_name=None,
                        all_scores=False, loader=None, sizes=None) -> dict:
    """Evaluate on clean images (no masks: the heated model is its classifier). Returns the
    metrics dict (keys :data:`pgnm_fast.metrics.METRIC_KEYS`; top-5 only with more than 5
    classes). With ``json_path`` also write, beside it, the per-class table and the confusion
    matrix (CSV, and PNG with matplotlib); with ``predictions_path`` one CSV row per image (every
    class's score with ``all_scores``). The JSON holds the metrics and what produced them
    (:func:`eval_record`; docs/outputs.md). ``loader``: the backend (default: torch where the
    checkpoint's run used it, else auto); ``sizes``: ``val_crop_size`` / ``val_resize_size``
    instead of the checkpoint's."""
    logits, labels, classes, files, inputs = _score_split(
        checkpoint, data, split, batch_size, workers, device, amp, log, show_progress, model_name,
        backend=loader, sizes=sizes)
    metrics, absent = classification_metrics(logits, labels, classes)
    metrics = reported_metrics(metrics, len(classes))  # top-5 only with more than 5 classes
    if absent:
        warn(f"warning: the {split} split lacks {len(absent)} of {len(classes)} classes "
             f"({', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}): macro metrics and "
             f"ROC-AUC are over the {len(classes) - len(absent)} classes present")
    if json_path is not None:
        write_json_atomic(eval_record(metrics, checkpoint, split, inputs, classes, absent),
                          json_path)
        log(f"metrics written to {json_path}")
        _write_per_class(logits, labels, classes, Path(json_path), split, log)
    if predictions_path is not None:
        write_predictions(predictions_path, files, logits, labels, classes,
                          all_scores=all_scores)
        log(f"predictions of {len(files)} images written to {predictions_path}")
    return metrics


def _write_per_class(logits, labels, classes, json_path: Path, split: str, log) -> None:
    """NAME.per_class.csv, NAME.confusion.csv and NAME.confusion.png beside NAME.json."""
    from . import plots
    table, matrix = per_class_metrics(logits, labels)
    stem = json_path.with_suffix("")
    written = [plots.write_per_class(table, classes, Path(f"{stem}.per_class.csv")),
               plots.write_confusion(matrix, classes, Path(f"{stem}.confusion.csv"))]
    try:
        written.append(plots.draw_confusion(matrix, classes, Path(f"{stem}.confusion.png"),
                                            f"{split} confusion matrix"))
    except plots.PlotsUnavailable as e:
        log(str(e))
    log("per-class results written to " + ", ".join(str(p) for p in written))


def eval_record(metrics: dict, checkpoint, split: str, inputs: dict, classes: list,
                absent: list) -> dict:
    """The eval JSON: the metrics (top level, NaN as null), then the checkpoint (path and sha256
    of its file; null for a folder), the data, split, transforms and the pgnm-fast version."""
    from . import __version__
    from .pipelines.packed import sha256_file
    path = Path(checkpoint)
    return {**json_safe(metrics),
            "checkpoint": str(path.resolve()) if path.exists() else str(checkpoint),
            "checkpoint_sha256": sha256_file(path) if path.is_file() else None,
            "data": inputs["data"], "split": split, "classes": len(classes),
            "absent_classes": list(absent), "transforms": inputs["transforms"],
            "pgnm_fast_version": __version__}


def write_predictions(path, files, logits, labels, classes, k: int = 5,
                      all_scores: bool = False) -> None:
    """One row per image: path, label, predicted class, then the top-k classes and their
    softmax scores (k = min(5, number of classes)); with ``all_scores`` then every class's
    score, in the classes' order, in columns ``score:<class>``."""
    from scipy.special import softmax  # here: the training path imports this module without scipy
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    with atomic_open(path, "w") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "predicted"]
                     + [name for i in range(1, k + 1) for name in (f"top{i}", f"top{i}_score")]
                     + ([f"score:{c}" for c in classes] if all_scores else []))
        for file, label, row, p in zip(files, labels, top, probs):
            out.writerow([file, classes[label], classes[row[0]]]
                         + [v for c in row for v in (classes[c], f"{p[c]:.6f}")]
                         + ([f"{x:.6f}" for x in p] if all_scores else []))


def predict_checkpoint(checkpoint, data=None, split="test", batch_size=None, workers=None,
                       device=None, amp=False, log=print, show_progress=True, model_name=None):
    """``(logits, labels, classes)`` of a checkpoint's classifier over a split, in the split's
    order, labels as indices into the checkpoint's classes. ``checkpoint``: any form
    :func:`pgnm_fast.weights.read_weights` reads; a file without class names takes the data's
    (their count must match its head), one without settings the defaults' crop and
    normalisation (a timm folder's where its config.json gives them)."""
    return _score_split(checkpoint, data, split, batch_size, workers, device, amp, log,
                        show_progress, model_name)[:3]


def input_config(w, sizes: dict | None = None) -> TrainConfig:
    """The crops, normalisation and channels weights ``w`` (:class:`~pgnm_fast.weights.Weights`)
    are scored and fine-tuned with (eval, transfer): a pgnm-fast checkpoint's own; for outside
    weights the defaults (1 channel, RadImageNet's normalisation, 224 / 256), or a timm folder's
    ``pretrained_cfg`` input size, crop fraction, mean and std; then ``sizes``
    (``--train-crop-size`` ...: a crop flag given wins)."""
    if w.state is not None:
        return w.state.train_config.replace(**(sizes or {}))
    cfg, pretrained = TrainConfig(channels=1), w.meta.get("pretrained_cfg", {})
    if pretrained.get("input_size"):
        crop = int(pretrained["input_size"][-1])
        resize = int(round(crop / pretrained.get("crop_pct", crop / cfg.val_resize_size)))
        cfg = cfg.replace(train_crop_size=crop, val_crop_size=crop, val_resize_size=resize)
    if pretrained.get("mean") and pretrained.get("std"):
        cfg = cfg.replace(mean=float(pretrained["mean"][0]), std=float(pretrained["std"][0]))
    return cfg.replace(**(sizes or {}))


def _score_split(checkpoint, data, split, batch_size, workers, device, amp, log, show_progress,
                 model_name=None, backend=None, sizes=None):
    """:func:`predict_checkpoint`'s result, the split's file paths and the inputs it read
    (``{"data", "transforms"}``)."""
    w = read_weights(checkpoint)
    name = resolve_model(w, model_name)
    cfg = input_config(w, sizes)
    saved_data = w.state.data if w.state is not None else None
    if data is None and not saved_data:
        raise DataError(f"{checkpoint} does not name its data set: pass --data")
    root = Path(data) if data is not None else Path(saved_data)
    source = open_source(root)
    if split not in source.splits:
        raise DataError(f"data at {root} has no {split!r} split (it has: {', '.join(source.splits)})")
    part = source.split(split)
    classes = list(w.classes) if w.classes is not None else list(source.classes)
    if len(classes) != w.num_classes:
        n, plural = len(classes), "es" * (len(classes) != 1)
        where = f"names {n} class{plural}" if w.classes is not None else f"{root} has {n} class{plural}"
        raise DataError(f"{checkpoint} has a {w.num_classes}-class head, {where}")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({source.classes[i] for i in np.unique(part.labels)} - set(index))
    if unknown:
        raise DataError(f"the {split} split of {root} has classes the checkpoint {checkpoint} was not "
                        f"trained on: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    remap = np.array([index.get(name, -1) for name in source.classes], dtype=np.int64)
    info = init_distributed(device)
    channels = cfg.channels
    model = create_model(name, len(classes), in_chans=channels)
    fit_classifier(model, w, name, classes, log, training=False)
    model.to(info.device)
    crop, resize, norm = cfg.val_crop_size, cfg.val_resize_size, cfg.normalisation()
    loader = make_loader(part, train=False, batch_size=batch_size or cfg.batch_size or cfg.global_batch,
                         crop_size=crop, resize_size=resize, channels=channels,
                         workers=cfg.workers if workers is None else workers,
                         rank=0, world_size=1, device=info.device, log=log,
                         backend=backend or ("torch" if cfg.loader == "torch" else "auto"), **norm)
    logits, labels = predict(model, loader, info.device, amp=amp, show_progress=show_progress,
                            desc=f"eval {split}")
    inputs = {"data": str(root.resolve()),
              "transforms": {"resize_size": resize, "crop_size": crop, "mean": norm["mean"],
                             "std": norm["std"], "channels": channels}}
    return logits, remap[labels], classes, list(part.files), inputs
