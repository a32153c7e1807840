"""`pgnm-fast transfer`: few-shot transfer of pretrained classifiers to unseen concepts
(docs/method.md §6): for each starting checkpoint, each training-set size n and each repeat,
fine-tune on n images of a downstream set and score the full test split.

The protocol (also written into ``transfer.json``):

- n is the number of training images in all, class-stratified: every class gets n // C images
  and n mod C classes, chosen at random, one more. They are drawn without replacement from the
  train split (never a file of the test split), seeded by (``--seed``, n, repeat), so a subset is
  reproducible and the same for every checkpoint: the checkpoints are compared on the same images.
  A shot count that a class cannot supply (it has fewer than ceil(n / C) training images) is
  skipped with a line naming the class and its count, and the other shot counts run; with none
  left the command stops with one ``Error:`` line.
- A ``--from`` is any form ``--initial-checkpoint`` reads (:func:`pgnm_fast.weights.read_weights`:
  a pgnm-fast checkpoint, a plain state dict in ``.pth`` or ``.safetensors``, a timm / Hugging
  Face folder, the authors' files). A pgnm-fast checkpoint brings its crops, normalisation and
  channels; other weights are fed grey images (a 3-channel stem summed) at 224 / 256 with
  RadImageNet's normalisation, or a timm folder's ``pretrained_cfg`` input size, crop fraction,
  mean and std (:func:`pgnm_fast.evaluate.input_config`). A label used twice, or one file given twice, is refused.
- Each run starts from the checkpoint's classifier; a checkpoint whose classes differ from the
  downstream set gets a new head and keeps its trunk. It trains ``--steps`` SGD steps (momentum
  0.9, weight decay 1e-4, cosine from ``--lr`` to 0) on batches of min(n, ``--batch-size``)
  images with the train transform of docs/method.md §1 at the checkpoint's crop size. With
  ``--probe`` only the new head trains and BatchNorm is frozen (running statistics kept), the
  authors' downstream protocol; without it the whole network fine-tunes.
- Each run scores macro F1, balanced accuracy and macro one-vs-one ROC-AUC (and top-1) on the
  full test split; the table and ``transfer.png`` give per checkpoint and n the mean over repeats
  and its 95% t-interval (over repeats: the training subset and the run's randomness; the test
  split is fixed), and each checkpoint's paired difference against the first ``--from`` (or
  ``--reference LABEL``), repeat by repeat on the same subsets, with its interval over repeats
  (:mod:`pgnm_fast.transfer_report`; below 3 repeats the repeats' values instead).

All runs share one process: the test images are loaded once (kept in memory when they fit in
``TEST_CACHE_BYTES``), the training images of all subsets are decoded once, and each run builds
only its model, optimiser and an in-process loader (no worker start-up).

``transfer.json`` is rewritten after every run, so an interrupted transfer continues where it
stopped when run again with the same ``--out``: a finished (checkpoint, n, repeat) run is reused,
not trained again. Other ``--shots``, ``--repeats`` or more ``--from`` checkpoints add to the
folder; a folder made under another protocol (data, classes, ``--probe``, ``--steps``, ``--lr``,
``--batch-size``, ``--seed``) or from a checkpoint file whose content changed under the same name
is refused, naming the setting. Runs outside the requested grid stay in ``transfer.json`` and
are left out of its table and chart.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json_atomic
from .config import TrainConfig
from .distributed import init_distributed
from .engine import N_STATS, PlainStep, TrainingDiverged, predict
from .errors import ConfigError, DataError
from .evaluate import input_config
from .folders import check_output_dir, lock_folder
from .metrics import classification_metrics, json_safe
from .models import create_model
from .pipelines import make_loader
from .pipelines.loader import batch_loader
from .pipelines.packed import sha256_file
from .pipelines.samplers import split_key
from .pipelines.sources import Split, open_source
from .pipelines.transforms import build_transform
from .run_state import RunState
from .state_checks import json_type
from .transfer_report import (  # noqa: F401  (score_limits: part of this module's interface)
    SCORE_KEYS,
    format_table,
    score_limits,
    summaries,
    write_transfer_chart,
)
from .transfer_subsets import Subsets, feasible_shots, parse_shots
from .weights import Weights, fit_classifier, read_weights, resolve_model

DEFAULT_SHOTS = (16, 32, 64, 128, 256)
TEST_CACHE_BYTES = 2 << 30  # keep the preprocessed test split in memory up to this size


class _Decoded(torch.utils.data.Dataset):
    """The train transform over images decoded once (grey PIL images kept in memory)."""

    def __init__(self, images: list, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i, generator = split_key(key)  # the train sampler's (index, augmentation seed)
        return self.transform(self.images[i], generator), int(self.labels[i])


def _test_batches(split: Split, cfg, device, workers: int, loader: str, log):
    """The test split through the eval transform: a list of batches in memory when it fits in
    TEST_CACHE_BYTES, else the loader itself (iterated once per run)."""
    test = make_loader(split, train=False, batch_size=128, crop_size=cfg.val_crop_size,
                       resize_size=cfg.val_resize_size, channels=cfg.channels, workers=workers,
                       rank=0, world_size=1, device=device, backend=loader, log=log,
                       **cfg.normalisation())
    size = len(split) * cfg.channels * cfg.val_crop_size ** 2 * 4
    if size > TEST_CACHE_BYTES:
        return test
    # copies: a loader may yield the same buffers every batch (DALI's outputs)
    return [(x.to("cpu", copy=True), y.to("cpu", copy=True)) for x, y in test]


def _model(w: Weights | RunState, classes: list, device, probe: bool, channels: int = 1):
    if isinstance(w, RunState):
        w = Weights.from_run_state(w)
    name = resolve_model(w, None)
    channels = w.state.in_chans if w.state is not None else channels
    model = create_model(name, len(classes), in_chans=channels)
    fit_classifier(model, w, name, classes, log=lambda *_: None)
    model.to(device).train()
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.fc
    if not probe:
        return model, list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    for m in model.modules():  # frozen BatchNorm: running statistics, not the batch's
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model, list(head.parameters())


def fine_tune(state, classes, images, labels, cfg, *, steps: int, lr: float, batch_size: int,
              probe: bool, seed: int, device, amp: bool = False):
    """One run: the checkpoint's classifier with a head for ``classes``, ``steps`` SGD steps on
    the decoded ``images``; returns (model, mean train loss)."""
    torch.manual_seed(seed)  # the new head and, with an in-process loader, the augmentation
    model, params = _model(state, classes, device, probe, cfg.channels)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    data = _Decoded(images, labels, build_transform(True, crop_size=cfg.train_crop_size,
                                                    channels=cfg.channels, **cfg.normalisation()))
    loader = batch_loader(data, "few-shot", train=True, batch_size=min(batch_size, len(data)),
                          workers=0, seed=seed, rank=0, world_size=1, device=device)
    step = PlainStep(model, optimizer, amp, device)
    stats = torch.zeros(N_STATS, device=device)
    done = 0
    while done < steps:
        for x, y in loader:
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True), stats)
            schedule.step()
            done += 1
            if done == steps:
                break
    loss = (stats[0] / stats[4]).item()  # one read per run
    return model, loss


def _label(path: Path, paths: list[Path]) -> str:
    """A start's default label: its folder's name (a model folder's own name), or its path
    where two share that name."""
    def name(p):
        return p.name if p.is_dir() else p.parent.name
    names = [name(p) for p in paths]
    return name(path) if names.count(name(path)) == 1 else str(path)


def weights_sha256(path) -> str:
    """sha256 of a weights file; of a model folder, over its weights file and config.json."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    import hashlib
    digest = hashlib.sha256()
    for part in ("model.safetensors", "pytorch_model.bin", "config.json"):
        if (path / part).is_file():
            digest.update(f"{part}:{sha256_file(path / part)}\n".encode())
    return digest.hexdigest()


def read_starts(froms: list[Path], labels) -> tuple[list[str], list[Weights], dict]:
    """Each ``--from`` read (any form :func:`pgnm_fast.weights.read_weights` reads), its label
    and ``{label: sha256}``; a label used twice, or one file given twice (the same resolved path
    or the same content), is refused before any run."""
    names = list(labels) if labels else [_label(f, froms) for f in froms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--label {twice[0]!r} names two --from checkpoints: give each its own "
                          f"label")
    starts = [read_weights(f) for f in froms]  # a bad checkpoint fails before training
    sums = [weights_sha256(f) for f in froms]
    for i, (f, digest) in enumerate(zip(froms, sums)):
        for g, other in zip(froms[:i], sums[:i]):
            if f.resolve() == g.resolve() or digest == other:
                how = "is" if f.resolve() == g.resolve() else "has the same content as"
                raise ConfigError(f"--from {f} {how} --from {g}: each checkpoint once")
    return names, starts, dict(zip(names, sums))


def transfer(froms, data, shots=DEFAULT_SHOTS, repeats: int = 5, out=None, probe: bool = False,
             steps: int = 100, lr: float | None = None, batch_size: int = 32, seed: int = 0,
             labels=None, workers: int = 2, loader: str = "auto", amp: bool = False,
             device=None, log=print, reference: str | None = None, sizes=None) -> dict:
    """Every (checkpoint, n, repeat) run in this process (module docstring); writes
    ``transfer.json`` and ``transfer.png`` into ``out`` and returns the report. ``sizes``:
    crop sizes (``train_crop_size``, ``val_crop_size``, ``val_resize_size``) instead of each
    checkpoint's."""
    froms = [Path(f) for f in froms]
    lr = _checked_lr(froms, labels, repeats, steps, batch_size, lr, probe)
    names, states, sums = read_starts(froms, labels)
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r} names no checkpoint: the labels are "
                          f"{', '.join(names)}")
    classes, train, test, pool_at, pool_labels = _pool(data, log)
    shots = feasible_shots(parse_shots(",".join(map(str, shots))), pool_labels, classes, log)
    info = init_distributed(device)
    out = Path(out) if out else Path("runs") / f"transfer-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(out, "--out")
    settings = {"data": str(Path(data).resolve()), "classes": classes, "shots": shots,
                "repeats": repeats, "probe": probe, "steps": steps, "lr": lr,
                "batch_size": batch_size, "seed": seed, **_starts_record(names, froms, states,
                                                                          sums, sizes)}
    log(f"transfer: {len(froms)} checkpoint(s) x n in {shots} x {repeats} repeats onto "
        f"{len(classes)} classes of {data} ({len(test)} test images); "
        f"{'--probe: new head only, BatchNorm frozen' if probe else 'whole network fine-tuned'}"
        f", {steps} steps of lr {lr} (cosine) -> {out}")
    with lock_folder(out, "transfer folder"):
        stored = _stored_runs(out / "transfer.json", settings)
        grid = [(name, n, r) for name in names for n in shots for r in range(repeats)]
        in_grid = set(grid)
        kept = [run for key, run in stored.items() if key not in in_grid]
        t0 = time.perf_counter()
        train_one = functools.partial(_run, classes=classes, steps=steps, lr=lr,
                                      batch_size=batch_size, probe=probe, seed=seed,
                                      device=info.device, amp=amp, log=log)
        test_of = functools.partial(_test_batches, test, device=info.device, workers=workers,
                                    loader=loader, log=log)
        images = Subsets(train, pool_at, pool_labels, shots, repeats, len(classes), seed)
        runs = _train_grid([(n, w, input_config(w, sizes)) for n, w in zip(names, states)],
                           shots, repeats, stored, images, test_of, train_one,
                           save=lambda runs: write_json_atomic(
                               {"settings": settings, "runs": runs + kept}, out / "transfer.json"))
        trained = sum(key not in stored for key in grid)
        report = {"settings": settings, "runs": runs + kept,
                  **summaries(runs, reference or names[0]),
                  "trained": trained, "reused": len(grid) - trained,
                  "seconds": time.perf_counter() - t0}
        if stored:
            log(f"transfer: {sum(k in stored for k in grid)} of {len(grid)} runs reused from "
                f"{out / 'transfer.json'}" + (f"; {len(kept)} runs outside this grid kept in it"
                                              if kept else ""))
        write_json_atomic(report, out / "transfer.json")
        for line in format_table(report):
            log(line)
        chart = write_transfer_chart(report, out / "transfer.png")
    log(f"transfer: {trained} of {len(grid)} runs trained, {len(grid) - trained} reused, in "
        f"{report['seconds']:.0f} s; written to "
        f"{out / 'transfer.json'}" + (f" and {chart}" if chart else ""))
    return report


def _train_grid(starts, shots, repeats, stored: dict, images: Subsets, test_of, train_one,
                save) -> list:
    """Every (start, n, repeat) run not in ``stored`` (reused as it is), in order; ``save``
    records the runs so far after each one. One test loader per preprocessing, built once."""
    runs, tests = [], {}
    for name, state, cfg in starts:
        key = (cfg.val_crop_size, cfg.val_resize_size, cfg.channels, cfg.mean, cfg.std)
        for n in shots:
            for r in range(repeats):
                if (name, n, r) in stored:
                    runs.append(stored[(name, n, r)])
                    continue
                if key not in tests:
                    tests[key] = test_of(cfg)
                subset, labels = images(n, r)
                runs.append(train_one(name, state, cfg, images=subset, labels=labels,
                                      test=tests[key], n=n, r=r))
                save(runs)
    return runs


def _checked_lr(froms, labels, repeats, steps, batch_size, lr, probe) -> float:
    """The arguments' checks (one line naming the flag); returns the lr (``--probe``: 0.1, else
    0.01 when not given)."""
    if not froms:
        raise ConfigError("transfer needs at least one --from checkpoint")
    if labels and len(labels) != len(froms):
        raise ConfigError(f"--label given {len(labels)} times for {len(froms)} --from checkpoints")
    for name, value in (("--repeats", repeats), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be positive, not {value}")
    lr = lr if lr is not None else (0.1 if probe else 0.01)
    if lr <= 0:
        raise ConfigError(f"--lr must be positive, not {lr}")
    return lr


def _pool(data, log):
    """``(classes, train, test, pool_at, pool_labels)``: the data's splits and the train images
    a subset may draw (those not also in the test split), by their train index and label."""
    source = open_source(data)
    for split in ("train", "test"):
        if split not in source.splits:
            raise DataError(f"data at {data} has no {split} split: transfer draws its training "
                            f"images from train and scores on test")
    classes, train, test = source.classes, source.split("train"), source.split("test")
    in_test = set(test.files)
    pool = np.array([f not in in_test for f in train.files])
    if not pool.all():
        log(f"transfer: {int((~pool).sum())} train files are also in the test split: left out")
    return classes, train, test, np.flatnonzero(pool), train.labels[pool]


def _starts_record(names, froms, states, sums, sizes) -> dict:
    """The fixed part of ``transfer.json``'s settings and what it records of each start."""
    return {"momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
            "shots_are": "training images in all, class-stratified, from the train split",
            "interval": "95% t-interval over repeats (logit scale for scores, Fisher's z "
                        "for paired differences)",
            "checkpoints": {n: str(f) for n, f in zip(names, froms)},
            "checkpoint_sha256": sums,
            "checkpoint_kinds": {n: w.kind for n, w in zip(names, states)},
            "inputs": {n: _inputs(input_config(w, sizes)) for n, w in zip(names, states)}}


def _inputs(cfg: TrainConfig) -> dict:
    return {"train_crop_size": cfg.train_crop_size, "val_crop_size": cfg.val_crop_size,
            "val_resize_size": cfg.val_resize_size, "channels": cfg.channels,
            **cfg.normalisation()}


def _run(name, state, cfg, classes, images, labels, test, n, r, *, steps, lr, batch_size, probe,
         seed, device, amp, log) -> dict:
    """One (checkpoint, n, repeat) run: fine-tune, then score the test split."""
    t_run = time.perf_counter()
    model, loss = fine_tune(state, classes, images, labels, cfg, steps=steps, lr=lr,
                            batch_size=batch_size, probe=probe,
                            seed=seed * 1_000_003 + n * 1009 + r, device=device, amp=amp)
    if not math.isfinite(loss):
        raise TrainingDiverged(f"transfer from {name}, n={n}, repeat {r}: the loss became "
                               f"non-finite (try a lower --lr)")
    logits, y = predict(model, test, device, amp)
    metrics = json_safe(classification_metrics(logits, y, classes)[0])
    seconds = time.perf_counter() - t_run
    log(f"transfer: {name} n={n} repeat {r}: f1_macro {metrics['f1_macro']:.4f} "
        f"balanced_accuracy {metrics['balanced_accuracy']:.4f} ({seconds:.1f} s)")
    return {"checkpoint": name, "n": n, "repeat": r, "train_loss": loss, "seconds": seconds,
            **{k: metrics[k] for k in SCORE_KEYS}}


# the settings a reused run must share, and the flag that sets each
PROTOCOL = {"data": "--data", "classes": "--data", "probe": "--probe", "steps": "--steps",
            "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed",
            "momentum": "the version", "weight_decay": "the version", "schedule": "the version"}


def _stored_runs(path: Path, settings: dict) -> dict:
    """``{(checkpoint, n, repeat): run}`` of an earlier transfer into the same folder, after
    checking it was made under the same protocol and checkpoints (module docstring)."""
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
        old, runs = stored["settings"], stored["runs"]
        for key, value, kind in (("settings", old, dict), ("runs", runs, list)):
            if not isinstance(value, kind):
                raise DataError(f"{path}: '{key}' is {json_type(value)}, expected "
                                f"{json_type(kind())}; choose another --out")
        done = {(x["checkpoint"], int(x["n"]), int(x["repeat"])): x for x in runs}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a transfer.json this version can continue "
                        f"({type(e).__name__}); choose another --out") from None
    for key, flag in PROTOCOL.items():
        if old.get(key) != settings[key]:
            raise ConfigError(f"{path.parent} was made with {key} = {old.get(key)!r}, not "
                              f"{settings[key]!r} ({flag}): run with the same settings to "
                              f"continue it, or choose another --out")
    sums = old.get("checkpoint_sha256", {})
    for name, digest in settings["checkpoint_sha256"].items():
        if name in sums and sums[name] != digest:
            raise ConfigError(f"{path.parent} holds runs from another checkpoint named {name!r} "
                              f"(--from {settings['checkpoints'][name]} has other content; "
                              f"--label names it): choose another --out or --label")
    # the runs of a checkpoint not asked for this time stay, and so does its record
    settings["checkpoints"] = {**old.get("checkpoints", {}), **settings["checkpoints"]}
    settings["checkpoint_sha256"] = {**sums, **settings["checkpoint_sha256"]}
    for key in ("checkpoint_kinds", "inputs"):
        settings[key] = {**old.get(key, {}), **settings[key]}
    return done
