"""The PGNM stages end to end: heated (policy + masks), baseline (no policy), fine-tune.

Construction and the epoch loop. Everything that can be wrong with the user's input (data,
checkpoint, flags, run folder) is checked before the run folder is touched
(:mod:`pgnm_fast.prepare`); the folder then holds
``last.pt``, ``best.pt`` (by validation macro F1), ``metrics.jsonl`` and ``config.json``
(:mod:`pgnm_fast.run_folder`), and with ``--average-last N`` also ``averaged.pt``
(:mod:`pgnm_fast.averaging`). What depends on the device is decided once into an
:class:`~pgnm_fast.speed.ExecutionPlan`; the CPU thread count is :mod:`pgnm_fast.threads`'.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .averaging import LastEpochsAverage
from .batching import batch_line, norm_line, reward_lines
from .console import epoch_lines, format_val, resume_hint
from .distributed import (
    all_reduce_mean,
    barrier,
    broadcast_buffers,
    cleanup,
    gather_to_main,
)
from .engine import HeatedStep, PlainStep, check_finite_weights, predict, train_one_epoch, unwrap
from .errors import ConfigError, interrupt_in
from .graphs import GraphedStep
from .kernels import make_masker
from .metrics import classification_metrics, json_safe, mean_cross_entropy
from .models import PolicyNet, create_model
from .observe import RunObserver
from .optim import (
    build_lr_scheduler,
    build_optimizer,
    build_policy_lr_scheduler,
    build_policy_optimizer,
    param_groups,
    reset_hyperparameters,
)
from .pipelines import BatchLoader, make_loader
from .prepare import Run, prepare_run
from .run_folder import MetricsLog, hold_run_folder, save_epoch_states, write_config
from .run_state import RunState, save_run_state
from .self_check import check_and_fall_back
from .speed import ExecutionPlan, compile_modules, plan_execution, set_backends
from .threads import set_threads
from .weights import fit_classifier, fit_policy


def run_stage(stage: str, preset: str = "tiny", overrides: dict | None = None,
              data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
              resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
              device: str | None = None, log: Callable[[str], None] = print,
              show_progress: bool = True, keep_process_group: bool = False,
              resume_hint_on_interrupt: bool = True, recheck: bool = False) -> Path:
    """Train one stage; returns the run folder. Under torchrun the process group is taken down
    at the end unless ``keep_process_group`` (several stages in one run: compare). On Ctrl-C the
    command that resumes is printed unless ``resume_hint_on_interrupt`` is False.
    ``recheck``: check the image files afresh instead of reusing the cached verdict."""
    run = prepare_run(stage, preset, overrides, data, out, resume, init_from, device, log)
    run.recheck = recheck
    try:
        with hold_run_folder(run.out, resume, run.info.is_main):
            return _train(run, log if run.info.is_main else (lambda *_: None), show_progress)
    except BaseException as e:
        cleanup(run.info)
        interrupt = interrupt_in(e)
        if interrupt is None:
            raise
        if run.info.is_main and resume_hint_on_interrupt:
            last = run.out / "last.pt"
            log(resume_hint(run.cfg.stage, last, run.init_from) if last.exists() else
                "interrupted before the first epoch ended: nothing to resume")
        if interrupt is e:
            raise
        raise interrupt from None  # wrapped by a library it landed in: the CLI ends as on Ctrl-C
    finally:
        if not keep_process_group:
            cleanup(run.info)


@dataclasses.dataclass
class Parts:
    """The modules and optimisers of one stage (the policy ones are None without a policy) and
    the plan they were built for."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: object
    plan: ExecutionPlan
    policy: torch.nn.Module | None = None
    masker: torch.nn.Module | None = None
    policy_optimizer: torch.optim.Optimizer | None = None
    val_masker: torch.nn.Module | None = None  # validation's own, restarted each validation


def _build(run: Run, log) -> Parts:
    cfg, info, dev = run.cfg, run.info, run.info.device
    plan = plan_execution(cfg, dev, info.distributed)
    model = create_model(cfg.model, len(run.classes), in_chans=cfg.channels)
    if run.init is not None:
        fit_classifier(model, run.init, cfg.model, run.classes, log)
    set_backends(dev)
    model.to(dev, memory_format=plan.memory_format)
    policy = masker = None
    if cfg.policy:
        policy = PolicyNet(grid=cfg.grid, in_chans=cfg.channels, trunk=cfg.policy_model)
        if run.init is not None and run.init.policy is not None:
            fit_policy(policy, run.init, log)
        policy.to(dev, memory_format=plan.memory_format)
        masker = make_masker(cfg.impl, cfg.grid, cfg.train_crop_size,
                             seed=cfg.seed + 1000 * info.rank).to(dev)
    if cfg.compile:
        compile_modules([model, policy], dev, log)
    if info.distributed:
        model = _distribute(model, cfg, info)
        policy = _distribute(policy, cfg, info) if policy is not None else None
    optimizer = build_optimizer(param_groups(unwrap(model), cfg.stem_lr_scale, cfg.weight_decay),
                                cfg, cfg.lr, dev, capturable=plan.graphs)
    loss = dict(label_smoothing=cfg.label_smoothing, clip_grad_norm=cfg.clip_grad_norm,
                accum_steps=cfg.accum_steps)
    if policy is None:
        return Parts(model, optimizer, PlainStep(model, optimizer, cfg.amp, dev, **loss), plan)
    policy_optimizer = build_policy_optimizer(unwrap(policy), cfg, dev)
    step = HeatedStep(model, policy, masker, optimizer, policy_optimizer, cfg.amp, dev,
                      ema_sync=all_reduce_mean if info.distributed else None,
                      reward_group=cfg.reward_group, **loss)
    val_masker = make_masker(cfg.impl, cfg.grid, cfg.val_crop_size, seed=cfg.seed + 1).to(dev)
    return Parts(model, optimizer, step, plan, policy, masker, policy_optimizer, val_masker)


def _distribute(module, cfg, info):
    if _synced(cfg, info):  # SyncBatchNorm runs on GPUs only
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ddp = dict(device_ids=[info.local_rank]) if info.device.type == "cuda" else {}
    return torch.nn.parallel.DistributedDataParallel(module, **ddp)


def _restore(run: Run, parts: Parts, log) -> tuple[int, int, float]:
    """Load a --resume checkpoint; returns (start_epoch, global_step, best_f1). Learning rates
    are not restored: the schedulers are rebuilt from the config at the resumed epoch."""
    s, cfg = run.resume_state, run.cfg
    if s is None:
        return 0, 0, -math.inf
    policy = unwrap(parts.policy) if parts.policy is not None else None
    s.restore(unwrap(parts.model), parts.optimizer, policy, parts.masker, parts.policy_optimizer,
              impl=cfg.impl, rng=run.info.world_size == 1)
    reset_hyperparameters(parts.optimizer, cfg.lr, cfg, run.info.device)
    if parts.policy_optimizer is not None:
        reset_hyperparameters(parts.policy_optimizer, cfg.effective_policy_lr(), cfg,
                              run.info.device)
    start_epoch = s.epoch + 1
    if start_epoch >= cfg.epochs:
        raise ConfigError(f"the run in {run.out} already finished its {cfg.epochs} epochs: "
                          f"raise --epochs to go on")
    log(f"resumed from epoch {s.epoch} (step {s.step}) of {run.out}")
    return start_epoch, s.step, s.best_f1


def _loaders(run: Run, plan: ExecutionPlan, log=print) -> tuple[BatchLoader, BatchLoader | None]:
    """The train loader and this process's validation loader, both laid out as ``plan`` says."""
    cfg, info = run.cfg, run.info
    common = dict(batch_size=cfg.batch_size, resize_size=cfg.val_resize_size,
                  channels=cfg.channels, workers=cfg.workers, device=info.device,
                  backend=cfg.loader, on_bad_image=cfg.on_bad_image, recheck=run.recheck,
                  log=log, **cfg.normalisation(), channels_last=plan.channels_last)
    # static (DALI and device, for graph replay): every train batch lands in the same two
    # tensors (loader.buffers); without it DALI's own output buffers are yielded, no copy.
    # _graphed then moves the device loader's fill into the captured step (defer_fill)
    train = make_loader(run.train_split, train=True, crop_size=cfg.train_crop_size, seed=cfg.seed,
                        rank=info.rank, world_size=info.world_size, static=plan.static_buffers,
                        class_balanced=cfg.class_balanced, **common)
    # validation: every process scores its shard (each image once); a split smaller than the
    # number of processes is scored by rank 0 alone (val is None on the others)
    shards = info.world_size if len(run.val_split) >= info.world_size else 1
    val = make_loader(run.val_split, train=False, crop_size=cfg.val_crop_size,
                      rank=info.rank if shards > 1 else 0, world_size=shards,
                      **common) if shards > 1 or info.is_main else None
    return train, val


def _graphed(parts: Parts, train_loader: BatchLoader, plan: ExecutionPlan, log):
    """The step as a CUDA graph (:mod:`pgnm_fast.graphs`) where the plan says so."""
    if not plan.graphs:
        if plan.graphs_blocked is not None:
            log(plan.graphs_blocked)
        return parts.step
    optimizers = [o for o in (parts.optimizer, parts.policy_optimizer) if o is not None]
    # the device loader: its batch fill joins the step (augmentation inside the graph)
    defer = getattr(train_loader, "defer_fill", None) if plan.static_buffers else None
    prologue = defer() if defer is not None else None
    log("--graphs: the step is captured as a CUDA graph after 3 eager steps"
        + (", reading the loader's static batch buffers" if train_loader.static else "")
        + (", the loader's augmentation captured with it" if prologue is not None else ""))
    return GraphedStep(parts.step, optimizers, warmup=3, static_inputs=plan.static_buffers,
                       prologue=prologue, log=log)


def _announce(run: Run, parts: Parts, train_loader: BatchLoader, threads: str | None) -> str:
    """The stage's start line: what trains on what, and where it goes."""
    cfg, info = run.cfg, run.info
    return (f"{cfg.stage}: {cfg.model} ({len(run.classes)} classes"
            + (f", {cfg.policy_model} policy, grid {cfg.grid}, {cfg.impl} mask step"
               if parts.policy else "")
            + f") on {info.device}, {cfg.epochs} epochs"
            + f"\n  {batch_line(cfg, info.world_size)}"
            + f"\n  {norm_line(cfg, info.world_size, _synced(cfg, info))}"
            + (f"\n  {reward_lines(cfg)}" if parts.policy else "")
            + (f"\n  {threads}" if threads is not None else "")
            + (f"\n  weights from {run.init_from}" if run.init_from else "")
            + f"\n  data: {len(run.train_split)} train / {len(run.val_split)} val images from "
              f"{run.data_root} through {train_loader.name}\n  run folder: {run.out}")


def _synced(cfg, info) -> bool:
    """Whether BatchNorm runs as SyncBatchNorm across the processes (see ``_distribute``)."""
    return info.distributed and cfg.sync_bn and info.device.type == "cuda"


def _train(run: Run, log, show_progress) -> Path:
    cfg, info, dev = run.cfg, run.info, run.info.device
    changes = check_and_fall_back(cfg, dev, log)  # the fast paths on this device, cached
    if changes:
        cfg = run.cfg = cfg.replace(**changes)  # config.json records what ran
    torch.manual_seed(cfg.seed + info.rank)
    parts = _build(run, log)
    start_epoch, global_step, best_f1 = _restore(run, parts, log)
    schedulers = [build_lr_scheduler(parts.optimizer, cfg, start_epoch)]
    if parts.policy is not None:
        schedulers.append(build_policy_lr_scheduler(parts.policy_optimizer, cfg, start_epoch))
    train_loader, val_loader = _loaders(run, parts.plan, log)
    resumed = run.resume_state.train_config if run.resume_state is not None else None
    cfg, threads = set_threads(cfg, dev, resumed)  # recorded with the run, kept on resume
    run.cfg = cfg
    step = _graphed(parts, train_loader, parts.plan, log)
    averager = None
    if cfg.average_last:  # on every process: each validates its shard of the average
        averager = LastEpochsAverage(unwrap(parts.model), cfg.epochs, cfg.average_last)
        if run.resume_state is not None and run.resume_state.averaged is not None:
            averager.load_state_dict(run.resume_state.averaged, log)
    metrics_log = MetricsLog(run.out / "metrics.jsonl")
    if info.is_main:
        write_config(run.out, cfg, run.data_root)
        metrics_log.keep_until(start_epoch - 1)
    write = metrics_log.write if info.is_main else (lambda record: None)
    if info.is_main:  # one warning line if the train CE blows up
        from .console import DivergenceWatch
        write = DivergenceWatch(len(run.classes), log, heated=parts.policy is not None,
                                first_epoch=DivergenceWatch.first_epoch_ce(metrics_log.path)).wrap(write)
    for note in run.notes:  # e.g. a shortened warm-up
        log(note)
    log(_announce(run, parts, train_loader, threads))
    observer = RunObserver(run.out, run.classes, cfg, write, log) if info.is_main else None

    t0, images_seen = time.perf_counter(), 0
    progress = EpochProgress(best_f1)
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        lrs = {"lr": parts.optimizer.param_groups[0]["lr"]}
        if parts.policy_optimizer is not None:
            lrs["policy_lr"] = parts.policy_optimizer.param_groups[0]["lr"]
        t_epoch = time.perf_counter()
        global_step, train_stats = train_one_epoch(
            step, train_loader, dev, epoch, global_step, cfg.print_freq,
            log_step=lambda rec, lrs=lrs: write(dict(rec, **lrs)),
            show_progress=show_progress and info.is_main, log_line=log,
            accum_steps=cfg.accum_steps)
        images_seen += train_stats["images"] * info.world_size
        for scheduler in schedulers:
            scheduler.step()
        end_epoch(run, parts, val_loader, averager, progress, epoch, global_step, train_stats,
                  lrs, t_epoch, write, log, observer, show_progress)
        barrier(info)
    if info.is_main and progress.last_val is not None:
        log(_done_line(run, progress, start_epoch, global_step,
                       images_seen / max(time.perf_counter() - t0, 1e-9)))
    if observer is not None:
        observer.close()
    return run.out


@dataclasses.dataclass
class EpochProgress:
    """What the epochs carry from one to the next: the best validation macro F1 and its epoch, and
    the last validation metrics."""
    best_f1: float
    best_epoch: int | None = None
    last_val: dict | None = None


def _done_line(run: Run, progress: EpochProgress, start_epoch: int, global_step: int,
               images_per_second: float) -> str:
    cfg = run.cfg
    best = f"best val f1_macro {progress.best_f1:.4f}" + (
        f" (epoch {progress.best_epoch})" if progress.best_epoch is not None else "")
    return (f"{cfg.stage} stage done: {cfg.epochs - start_epoch} epochs, {global_step} steps, "
            f"{images_per_second:.0f} img/s, {best}, final val top1 "
            f"{progress.last_val['top1']:.4f}\n  -> {run.out / 'best.pt'}")


def end_epoch(run: Run, parts: Parts, val_loader: BatchLoader | None,
              averager: LastEpochsAverage | None, progress: EpochProgress, epoch: int,
              global_step: int, train_stats: dict, lrs: dict, t_epoch: float,
              write: Callable[[dict], None], log: Callable[[str], None],
              observer: RunObserver | None = None, show_progress: bool = False) -> None:
    """Everything after an epoch's training steps: validate (and the weight average after the
    last epoch), then on rank 0 save ``averaged.pt``, ``last.pt`` and ``best.pt``, log the epoch
    to ``metrics.jsonl`` and the console. ``lrs``: the epoch's learning rates; ``t_epoch``: when
    its training started (``time.perf_counter``). ``observer``: rank 0's pictures and tables
    (:mod:`pgnm_fast.observe`)."""
    cfg, info = run.cfg, run.info
    check_finite_weights((parts.model, parts.policy), epoch)  # the last update, unread so far
    broadcast_buffers(unwrap(parts.model), info)
    if hasattr(parts.val_masker, "manual_seed"):  # its own stream, restarted: a resumed run
        parts.val_masker.manual_seed(cfg.seed + 1)  # validates as an uninterrupted one
    t_val, val_scores = time.perf_counter(), []
    last_val = _validate(run, unwrap(parts.model), val_loader, parts.policy, parts.val_masker,
                         keep=val_scores, show_progress=show_progress)
    t_val = time.perf_counter() - t_val
    progress.last_val = last_val
    averaged_val = None
    if averager is not None:
        averager.update(unwrap(parts.model), epoch)
        if epoch == cfg.epochs - 1:
            averaged_val = _validate(run, averager.average.module, val_loader)
    if not info.is_main:
        return
    f1 = last_val["f1_macro"]
    improved = not math.isnan(f1) and f1 > progress.best_f1
    if improved:
        progress.best_f1, progress.best_epoch = f1, epoch
    state = _capture(run, parts, epoch, global_step, progress.best_f1, last_val)
    if averager is not None:
        state.averaged = averager.state_dict()
        if averaged_val is not None:  # before last.pt: a crash between can resume
            write(_save_average(run, averager, parts, averaged_val, state, log))
    seconds = time.perf_counter() - t_epoch
    record = dict(kind="epoch", epoch=epoch, step=global_step, seconds=seconds, **lrs,
                  **{k if k.startswith("train_") else f"train_{k}": v
                     for k, v in train_stats.items()},
                  val=json_safe(dict(last_val, loss=mean_cross_entropy(*val_scores))))
    save_epoch_states(state, run.out, improved, lambda: write(record))
    log(epoch_lines(epoch, cfg.epochs, train_stats, last_val, lrs["lr"], seconds, t_val,
                    heated=parts.policy is not None))
    if observer is not None:
        observer.end_epoch(epoch, global_step, parts.policy, val_loader, val_scores, improved)


def _capture(run: Run, parts: Parts, epoch: int, global_step: int, best_f1: float,
             val_metrics: dict) -> RunState:
    policy = unwrap(parts.policy) if parts.policy is not None else None
    return RunState.capture(run.cfg, run.classes, run.data_root, epoch=epoch, step=global_step,
                            best_f1=best_f1, val_metrics=val_metrics, model=unwrap(parts.model),
                            optimizer=parts.optimizer, policy=policy, masker=parts.masker,
                            policy_optimizer=parts.policy_optimizer)


def _validate(run: Run, model: torch.nn.Module, val_loader: BatchLoader | None,
              policy: torch.nn.Module | None = None, masker: torch.nn.Module | None = None,
              keep: list | None = None, show_progress: bool = False) -> dict | None:
    """Validation metrics of ``model`` on rank 0 (None on the others): every process with a
    loader scores its shard, rank 0 gathers the logits (see ``_loaders``) and appends
    (logits, labels) to the list ``keep`` if given. The loader lays the batches out already."""
    scored = None
    if val_loader is not None:
        scored = predict(model, val_loader, run.info.device, run.cfg.amp, policy=policy,
                         masker=masker, show_progress=show_progress and run.info.is_main,
                         desc="validation")
    gathered = gather_to_main(scored, run.info)
    if keep is not None and gathered is not None:
        keep.extend(gathered)
    return classification_metrics(*gathered, run.classes)[0] if gathered is not None else None


def _save_average(run: Run, averager: LastEpochsAverage, parts: Parts, metrics: dict,
                  state: RunState, log) -> dict:
    """Write ``averaged.pt`` with its validation metrics; returns the metrics record."""
    path = run.out / "averaged.pt"
    save_run_state(state.average(averager.model_state(unwrap(parts.model)), averager.epochs,
                                  metrics), path)
    log(f"averaged the weights of epochs {', '.join(map(str, averager.epochs))}: val "
        f"{format_val(metrics)}\n  -> {path}")
    return dict(kind="averaged", epochs=averager.epochs, val=json_safe(metrics))
