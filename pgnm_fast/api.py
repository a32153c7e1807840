"""The Python API: what the commands do, as functions (docs/api.md).

``from pgnm_fast import train, compare, transfer, evaluate, predict, load_weights, create_model``.
Keyword arguments are named as the commands' options are (``--batch-size`` is ``batch_size``,
``--initial-checkpoint`` is ``init_from``, ``--json`` is ``json_path``); the training settings
are the fields of :class:`~pgnm_fast.config.TrainConfig` (docs/flags.md). Values are checked
with the rules the command line applies, before anything runs: a mistake raises
:class:`~pgnm_fast.errors.ConfigError`, :class:`~pgnm_fast.errors.DataError` or
:class:`~pgnm_fast.errors.CheckpointError` with the one line the command would print. Paths may
be ``str`` or :class:`pathlib.Path`; ``log`` receives the progress lines (default ``print``).

Nothing heavy is imported here: each function imports what it runs.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import CROP_RATIO, FIELDS, STAGES, TrainConfig, check_value, make_config, meta
from .errors import ConfigError
from .names import LOADERS, MODELS

__all__ = ["train", "compare", "transfer", "evaluate", "predict", "load_weights", "create_model",
           "TrainConfig", "make_config"]

PathLike = str | os.PathLike
Log = Callable[[str], None]
CROPS = ("train_crop_size", "val_crop_size", "val_resize_size")
VAL_CROPS = ("val_resize_size", "val_crop_size")


def _setting_type(name: str) -> type:
    from .options import base_type
    return base_type(name)


def check_setting(where: str, name: str, value):
    """``value`` of the setting ``name`` (a TrainConfig field), checked as its flag is: its type
    (an int where a float is wanted becomes one), its choices and its range; None passes."""
    if name not in FIELDS or name == "stage":
        raise ConfigError(f"{where}: unknown setting {name!r} (the settings are TrainConfig's "
                          f"fields, listed in docs/flags.md)")
    if value is None:
        return None
    kind, field = _setting_type(name), meta(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}: {name} must be {kind.__name__}, not {value!r}")
    if field["choices"] and str(value) not in field["choices"]:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(field['choices'])}, "
                          f"not {value!r}")
    if field["rule"]:
        check_value(f"{where}: {name}", value, field["rule"])
    return value


def _check(where: str, name: str, value, rule: str | None = None, choices=None):
    """One argument that is not a setting: its range ``rule`` or its ``choices``."""
    if value is None:
        return
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(map(str, choices))}, "
                          f"not {value!r}")
    if rule is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, not {value!r}")
        check_value(f"{where}: {name}", value, rule)


def _expand_img_size(where: str, settings: dict, img_size: int | None, names=CROPS) -> dict:
    """``img_size`` into the crops of ``names`` that ``settings`` leaves unset (as
    ``--img-size``: train and val crop N, val resize round(N / 0.875))."""
    _check(where, "img_size", img_size, "positive")
    if img_size is None:
        return settings
    sizes = {n: round(img_size / CROP_RATIO) if n == "val_resize_size" else img_size for n in names}
    return {**settings, **{n: v for n, v in sizes.items() if settings.get(n) is None}}


def _split(where: str, func, kwargs: dict, settings: bool = True) -> tuple[dict, dict]:
    """``kwargs`` as (further keyword arguments of ``func``, checked TrainConfig settings, or
    with ``settings=False`` the rest unchecked)."""
    params = set(inspect.signature(func).parameters) - {"stage", "overrides", "sizes"}
    passed, rest = {}, {}
    for name, value in kwargs.items():
        if name in params:
            passed[name] = value
        else:
            rest[name] = check_setting(where, name, value) if settings else value
    return passed, rest


def _from_config_file(path: PathLike, stage: str) -> tuple[dict, dict]:
    """(run keys, settings) of a ``--config`` file; its stage must be ``stage``."""
    from .options import RUN_KEYS, read_config_file
    values = read_config_file(str(path))
    wanted = values.pop("stage", None)
    if wanted is not None and wanted != stage:
        raise ConfigError(f"--config {path}: stage {wanted!r}, not {stage!r}: pass "
                          f"stage={wanted!r}")
    run = {k: values.pop(k) for k in list(values) if k in RUN_KEYS}
    return run, values


def train(stage: str = "heated", data: PathLike | None = None, out: PathLike | None = None,
          preset: str | None = None, *, resume: PathLike | None = None,
          init_from: PathLike | None = None, config_file: PathLike | None = None,
          img_size: int | None = None, device: str | None = None, recheck: bool = False,
          log: Log = print, show_progress: bool = True, **settings) -> Path:
    """Train one stage and return its run folder (``pgnm-fast train`` / ``finetune``).

    ``stage``: ``"heated"`` (policy + masks), ``"baseline"`` (``train --no-policy``) or
    ``"finetune"`` (give ``init_from``). ``data``: any data form (docs/data.md); default: the
    data of the checkpoint it starts from, else the embedded synthetic set. ``out``: the run
    folder (default ``runs/<stage>-<time>``). ``preset``: ``"tiny"`` (default) or ``"paper"``.
    ``resume``: a ``last.pt`` to continue. ``init_from``: initial weights in any form (a
    heated ``last.pt`` for the fine-tune). ``config_file``: a YAML/JSON file of settings (a run's
    ``config.json``), beneath the keyword arguments. ``img_size``: sets the crops not given.
    ``**settings``: :class:`~pgnm_fast.config.TrainConfig` fields (``epochs``, ``batch_size``,
    ``lr``, ``model``, ``grid``, ``amp``, ...); None keeps the preset's. Further keywords of
    :func:`pgnm_fast.stages.run_stage` (``keep_process_group``, ...) pass through.

    Example: ``run = train("heated", data="data/", preset="tiny", epochs=2)``, then
    ``train("finetune", init_from=run / "last.pt")``.
    """
    from .stages import run_stage
    where = "train()"
    if stage not in STAGES:
        raise ConfigError(f"{where}: unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    passed, settings = _split(where, run_stage, settings)
    if config_file is not None:  # beneath the keywords; an img_size keyword beats its crops
        run, from_file = _from_config_file(config_file, stage)
        data = data if data is not None else run.get("data")
        out = out if out is not None else run.get("out")
        preset, device = preset or run.get("preset"), device or run.get("device")
        recheck = recheck or bool(run.get("recheck"))
        from_file = _expand_img_size(where, from_file, run.get("img_size"))
        if img_size is not None:
            from_file = {k: v for k, v in from_file.items() if k not in CROPS}
        settings = {**from_file, **{k: v for k, v in settings.items() if v is not None}}
    settings = _expand_img_size(where, settings, img_size)
    return run_stage(stage, preset=preset or "tiny", overrides=settings, data=data, out=out,
                     resume=resume, init_from=init_from, device=device, log=log,
                     show_progress=show_progress, recheck=recheck, **passed)


def compare(data: PathLike | None = None, out: PathLike | None = None, preset: str = "tiny", *,
            seeds: int = 1, seed: int = 0, finetune_from: str = "last", match_budget: bool = False,
            resamples: int = 1000, device: str | None = None, finetune_epochs: int | None = None,
            finetune_overrides: dict | None = None, img_size: int | None = None, log: Log = print,
            **settings) -> dict:
    """Heated + fine-tune against the baseline over seeds, paired on the test split
    (``pgnm-fast compare``); returns the report written to ``OUT/compare.json`` (its keys:
    docs/outputs.md). Run again with the same ``out`` to continue or to add seeds.

    ``**settings``: TrainConfig fields, given to the stages as the command's flags are: the
    execution ones (``batch_size``, ``workers``, ``threads``, ``loader``, ``amp``, ``graphs``,
    the crops) to all three stages, the others (``model``, ``epochs``, ``grid``, ``impl``, ...)
    to the heated stage and the baseline. ``finetune_epochs`` and ``finetune_overrides`` (a dict
    of TrainConfig fields) set the fine-tune's own. Further keywords of
    :func:`pgnm_fast.compare.compare` pass through.
    """
    from . import compare as module
    from .cli import EXECUTION
    where = "compare()"
    for name, value, rule in (("seeds", seeds, "positive"), ("seed", seed, "seed"),
                              ("resamples", resamples, "positive")):
        _check(where, name, value, rule)
    _check(where, "finetune_from", finetune_from, choices=module.FINETUNE_FROM)
    passed, settings = _split(where, module.compare, settings)
    settings = _expand_img_size(where, settings, img_size)
    shared = {k: settings.pop(k) for k in EXECUTION if k in settings}
    finetune = {name: check_setting(where, name, value)
                for name, value in (finetune_overrides or {}).items()}
    finetune = {**shared, "epochs": check_setting(where, "epochs", finetune_epochs), **finetune}
    return module.compare(data, out, preset, overrides={**shared, **settings},
                          finetune_overrides=finetune, device=device, resamples=resamples,
                          seed=seed, seeds=seeds, finetune_from=finetune_from,
                          match_budget=match_budget, log=log, **passed)


def _threads(where: str, threads: int | None) -> None:
    """``threads`` intra-op threads for this process (None: torch's setting stays)."""
    _check(where, "threads", threads, "positive")
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def transfer(froms: PathLike | Iterable[PathLike], data: PathLike, shots: str | Iterable[int] = "16,32,64,128,256",
             *, repeats: int = 5, out: PathLike | None = None, labels: Iterable[str] | None = None,
             reference: str | None = None, probe: bool = False, steps: int = 100,
             lr: float | None = None, batch_size: int = 32, seed: int = 0, workers: int = 2,
             threads: int | None = None, loader: str = "auto", amp: bool = False,
             device: str | None = None, img_size: int | None = None, log: Log = print,
             **kwargs) -> dict:
    """Few-shot transfer of checkpoints to a downstream set (``pgnm-fast transfer``); returns the
    report written to ``OUT/transfer.json`` (docs/outputs.md).

    ``froms``: one checkpoint or several (any weights form); ``labels``: a name for each;
    ``reference``: the label the others are compared with (default the first). ``shots``:
    training images in all per run, ``"16,32"`` or a list; ``repeats`` subsets per count.
    ``probe``: train only the new head. ``threads``: intra-op threads of this process (default:
    torch's). ``img_size`` and the crop keywords (``train_crop_size``, ``val_crop_size``,
    ``val_resize_size``): instead of each checkpoint's crops.
    """
    from . import transfer as module
    where = "transfer()"
    froms = [froms] if isinstance(froms, (str, os.PathLike)) else list(froms)
    shots = module.parse_shots(shots if isinstance(shots, str) else ",".join(map(str, shots)))
    for name, value, rule in (("repeats", repeats, "positive"), ("steps", steps, "positive"),
                              ("lr", lr, meta("lr")["rule"]), ("batch_size", batch_size, "batch"),
                              ("seed", seed, "seed"), ("workers", workers, "non_negative")):
        _check(where, name, value, rule)
    _check(where, "loader", loader, choices=("auto", "dali", "torch"))
    passed, sizes = _split(where, module.transfer, kwargs, settings=False)
    unknown = set(sizes) - set(CROPS)
    if unknown:
        raise ConfigError(f"{where}: unknown argument {sorted(unknown)[0]!r}")
    sizes = {k: v for k, v in _expand_img_size(where, sizes, img_size).items() if v is not None}
    _threads(where, threads)
    return module.transfer(froms, data, shots, repeats=repeats, out=out, probe=probe, steps=steps,
                           lr=lr, batch_size=batch_size, seed=seed,
                           labels=list(labels) if labels else None, workers=workers,
                           loader=loader, amp=amp, device=device, log=log, sizes=sizes,
                           reference=reference, **passed)


def _eval_checks(where: str, model, batch_size, workers, loader, threads) -> None:
    _check(where, "model", model, choices=MODELS)
    _check(where, "batch_size", batch_size, "positive")
    _check(where, "workers", workers, "non_negative")
    _check(where, "loader", loader, choices=LOADERS)
    _threads(where, threads)


def evaluate(checkpoint: PathLike, data: PathLike | None = None, split: str = "test", *,
             json_path: PathLike | None = None, predictions_path: PathLike | None = None,
             all_scores: bool = False, model: str | None = None, batch_size: int | None = None,
             workers: int | None = None, threads: int | None = None, loader: str | None = None,
             amp: bool = False, device: str | None = None, img_size: int | None = None,
             val_resize_size: int | None = None, val_crop_size: int | None = None,
             log: Log = print, warn: Log = print, show_progress: bool = True) -> dict:
    """Score a classifier on a split, on clean images (``pgnm-fast eval``); returns the metrics
    (keys :data:`pgnm_fast.metrics.METRIC_KEYS`: ``top1``, ``f1_macro``, ``roc_auc_ovo``, ...).

    ``checkpoint``: any weights form; ``data``: default the data it was trained on. ``json_path``:
    also write the metrics with what produced them, and beside it the per-class table and the
    confusion matrix; ``predictions_path``: one CSV row per image (``all_scores``: every
    class's score). ``model``: the architecture of a state dict that names none. The crops
    default to the checkpoint's. ``warn`` receives the warning lines (a class absent from the
    split).
    """
    from .evaluate import evaluate_checkpoint
    from .folders import check_output_dir
    where = "evaluate()"
    _eval_checks(where, model, batch_size, workers, loader, threads)
    sizes = {"val_resize_size": val_resize_size, "val_crop_size": val_crop_size}
    for name, value in sizes.items():
        _check(where, name, value, "positive")
    sizes = {k: v for k, v in _expand_img_size(where, sizes, img_size, VAL_CROPS).items()
             if v is not None}
    if all_scores and predictions_path is None:
        raise ConfigError(f"{where}: all_scores adds columns to predictions_path: pass both")
    if json_path is not None:
        if Path(json_path).is_dir():
            raise ConfigError(f"{where}: json_path {json_path} is a folder, not a file name")
        check_output_dir(Path(json_path).parent, "json_path")
    return evaluate_checkpoint(checkpoint, data, split, json_path, batch_size, workers, device,
                               bool(amp), log=log, warn=warn, show_progress=show_progress,
                               predictions_path=predictions_path, model_name=model,
                               all_scores=all_scores, loader=loader, sizes=sizes)


def predict(checkpoint: PathLike, data: PathLike | None = None, split: str = "test", *,
            model: str | None = None, batch_size: int | None = None, workers: int | None = None,
            threads: int | None = None, amp: bool = False, device: str | None = None,
            log: Log = print, show_progress: bool = True):
    """``(logits, labels, classes)`` of a classifier over a split, in the split's order:
    ``logits`` an (N, C) float array, ``labels`` (N,) indices into ``classes`` (the
    checkpoint's class names, else the data's). Arguments as :func:`evaluate`'s."""
    from .evaluate import predict_checkpoint
    where = "predict()"
    _eval_checks(where, model, batch_size, workers, None, threads)
    return predict_checkpoint(checkpoint, data, split, batch_size, workers, device, bool(amp),
                              log=log, show_progress=show_progress, model_name=model)


def load_weights(path: PathLike):
    """The weights in ``path``, in any form: a pgnm-fast checkpoint, a state dict (``.pth``,
    ``.pt``, ``.bin``, ``.safetensors``), a timm / Hugging Face model folder or the authors'
    checkpoint (docs/weights.md). Returns a :class:`pgnm_fast.weights.Weights`: ``model`` (the
    classifier's state dict, timm key names), ``model_name``, ``classes``, ``num_classes``,
    ``in_chans``, ``policy`` and, for a pgnm-fast checkpoint, ``state`` (the whole run state)."""
    from .weights import read_weights
    return read_weights(path)


def create_model(model_name: str | None = None, *, checkpoint_path: PathLike | None = None,
                 num_classes: int | None = None, in_chans: int | None = None,
                 classes: list | None = None, log: Log = print, **kwargs):
    """A classifier (a timm-compatible ResNet), as ``timm.create_model`` makes one.

    Without ``checkpoint_path``: random weights; ``model_name`` (``resnet10t``, ``resnet18``,
    ``resnet50``) and ``num_classes`` are needed, ``in_chans`` defaults to 1 (grey). With it: the
    weights of that file or folder (any form :func:`load_weights` reads); the architecture is
    the file's (``model_name``, if given, must agree), the head keeps the file's classes unless
    ``classes`` (names) or ``num_classes`` differ, which gives a new head on the loaded trunk;
    ``in_chans`` defaults to the weights' stem, and ``in_chans=1`` on a 3-channel stem sums it
    (exact for grey images). ``kwargs`` go to the ResNet (``drop_rate``, ...). The model is
    returned in training mode, as timm's are: call ``.eval()`` before predicting.
    """
    from .models import create_model as build
    from .weights import fit_classifier, resolve_model
    where = "create_model()"
    _check(where, "model_name", model_name, choices=MODELS)
    _check(where, "num_classes", num_classes, "positive")
    _check(where, "in_chans", in_chans, choices=(1, 3))
    if checkpoint_path is None:
        if model_name is None or num_classes is None:
            raise ConfigError(f"{where}: model_name and num_classes are needed without "
                              f"checkpoint_path")
        return build(model_name, num_classes, in_chans=in_chans or 1, **kwargs)
    weights = load_weights(checkpoint_path)
    name = resolve_model(weights, model_name)
    if classes is None:
        count = num_classes or weights.num_classes
        classes = (list(weights.classes) if weights.classes is not None and
                   count == weights.num_classes else list(range(count)))
    elif num_classes is not None and num_classes != len(classes):
        raise ConfigError(f"{where}: num_classes {num_classes} differs from the "
                          f"{len(classes)} classes given")
    model = build(name, len(classes), in_chans=in_chans or weights.in_chans or 1, **kwargs)
    fit_classifier(model, weights, name, list(classes), log, training=False)
    return model
