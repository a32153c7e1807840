"""The PGNM stages end to end: heated (policy + masks), baseline (no policy), fine-tune.

Everything that can be wrong with the user's input (data, checkpoint, flags, run folder) is checked
before the run folder is touched; the folder then holds ``last.pt``, ``best.pt`` (by validation
macro F1), ``metrics.jsonl`` and ``config.json``, and with ``--average-last N`` also
``averaged.pt`` (:mod:`pgnm_fast.averaging`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import run_state
from .atomic import atomic_open, remove_stale_temporaries, write_error
from .averaging import LastEpochsAverage
from .config import TrainConfig, config_from_dict, make_config
from .console import epoch_lines, format_val, resume_hint
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_buffers,
    cleanup,
    gather_to_main,
    init_distributed,
)
from .engine import HeatedStep, PlainStep, check_finite_weights, predict, train_one_epoch, unwrap
from .errors import ConfigError, DataError, interrupt_in
from .evaluate import write_json_atomic
from .folders import check_output_dir, lock_folder
from .graphs import GraphedStep
from .kernels import make_masker
from .metrics import classification_metrics, json_safe, mean_cross_entropy
from .models import PolicyNet, create_model
from .observe import RunObserver
from .pipelines import BatchLoader, make_loader
from .pipelines.badfiles import report_bad
from .pipelines.sources import open_source
from .provenance import run_record
from .run_state import RunState, load_run_state
from .schedules import build_lr_scheduler, build_policy_lr_scheduler
from .speed import compile_modules, set_backends, sgd_kind, use_channels_last
from .state_checks import check_fits, check_weights_fit, load_weights
from .weights import (
    Weights,
    build_optimizer,
    fit_classifier,
    fit_policy,
    param_groups,
    policy_param_groups,
    read_weights,
    reset_hyperparameters,
    resolve_model,
    stem_lr_scales,
)


@dataclasses.dataclass
class Run:
    """What one stage needs, assembled and checked before anything is written."""
    cfg: TrainConfig
    info: DistInfo
    data_root: Path
    classes: list
    train_split: object
    val_split: object
    out: Path
    resume_state: RunState | None = None
    init: Weights | None = None  # --initial-checkpoint / --from
    init_from: str | None = None  # the path of --initial-checkpoint / --from
    recheck: bool = False  # check the image files afresh (not the cached verdict)


def resolve_data(data: str | os.PathLike | None, states: Iterable[RunState | None],
                 cfg: TrainConfig, log: Callable[[str], None]) -> Path:
    """``--data``, else the data of a checkpoint the run starts from, else the embedded set."""
    if data is not None:
        return Path(os.path.abspath(Path(data).expanduser()))  # any folder can resume
    for state in states:
        if state is not None and state.data:
            return Path(state.data)
    from .synth import ensure_default_data
    return ensure_default_data(log=log, images=cfg.synth_images, size=cfg.synth_size)


def prepare_run(stage: str, preset: str = "tiny", overrides: dict | None = None,
                data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
                device: str | None = None, log: Callable[[str], None] = print) -> Run:
    """Check everything about a stage's input and assemble its :class:`Run` (nothing written)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    resume_state = load_run_state(resume) if resume else None
    init = read_weights(init_from) if init_from else None  # any form (pgnm_fast.weights)
    if resume_state is not None:
        if resume_state.stage != stage:
            raise ConfigError(f"--resume {resume} is a {resume_state.stage} checkpoint, not {stage}")
        cfg = config_from_dict(resume_state.config).replace(**overrides).check()
        check_fits(resume_state, cfg, resume, "--resume")
    else:
        if init is not None:
            overrides["model"] = resolve_model(init, overrides.get("model"))
            if init.checkpoint is not None:  # a pgnm-fast run's input form carries over
                overrides.setdefault("channels", init.checkpoint.get("in_chans", 1))
                for key in ("mean", "std"):
                    if init.checkpoint["config"].get(key) is not None:
                        overrides.setdefault(key, init.checkpoint["config"][key])
            for key, scale in stem_lr_scales(init, overrides.get("channels", 1)).items():
                overrides.setdefault(key, scale)
        cfg = make_config(stage, preset, **overrides)
    info = init_distributed(device)
    if data is None and init is not None and init.checkpoint is not None:
        data = init.checkpoint.get("data") or None  # the data the checkpoint was trained on
    data_root = resolve_data(data, (resume_state,), cfg, log)
    source = open_source(data_root, skip_bad=cfg.on_bad_image == "skip")
    train_split = source.split("train")
    if "val" not in source.splits:
        raise DataError(f"data at {data_root} has no val split (the run selects best.pt on it)")
    val_split = source.split("val")
    report_bad(source.problems, cfg.on_bad_image, None, log, what="entry")
    classes = list(source.classes)
    if resume_state is not None and list(resume_state.classes) != classes:
        raise DataError(f"the classes of {data_root} differ from those of --resume {resume}")
    if resume_state is not None:
        check_weights_fit(resume_state, cfg, classes, resume, "--resume")
    run_dir = Path(out) if out else (Path(resume).parent if resume else
                                     Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_fresh(run_dir, resume)
    check_output_dir(run_dir, "--out")
    if len(train_split) < cfg.batch_size * info.world_size:
        raise DataError(f"the train split of {data_root} has {len(train_split)} images, fewer than "
                        f"one batch of {cfg.batch_size} x {info.world_size} process(es): lower --batch-size")
    return Run(cfg, info, data_root, classes, train_split, val_split, run_dir, resume_state, init,
               str(init_from) if init_from else None)


def _check_fresh(run_dir: Path, resume) -> None:
    if resume is None and (run_dir / "last.pt").exists():
        raise ConfigError(f"run folder {run_dir} already holds a run (last.pt): continue it with "
                          f"--resume {run_dir / 'last.pt'} or choose another --out")


@contextlib.contextmanager
def _hold_run_folder(run: Run, resume, init_from, log):
    """Rank 0 locks the run folder (:mod:`pgnm_fast.folders`) and removes the temporaries of a
    killed checkpoint write."""
    if not run.info.is_main:
        yield
        return
    with lock_folder(run.out, "run folder"):
        _check_fresh(run.out, resume)  # another run may have finished here since the check
        remove_stale_temporaries(run.out)
        yield


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
        with _hold_run_folder(run, resume, init_from, log):
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
    """The modules and optimisers of one stage (the policy ones are None without a policy)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: object
    policy: torch.nn.Module | None = None
    masker: torch.nn.Module | None = None
    policy_optimizer: torch.optim.Optimizer | None = None
    val_masker: torch.nn.Module | None = None  # validation's own, restarted each validation
    channels_last: bool = False  # NHWC model and batches (speed.use_channels_last)


def _build(run: Run, log) -> Parts:
    cfg, info, dev = run.cfg, run.info, run.info.device
    model = create_model(cfg.model, len(run.classes), in_chans=cfg.channels)
    if run.init is not None:
        fit_classifier(model, run.init, cfg.model, run.classes, log)
    set_backends(dev)
    layout = torch.channels_last if use_channels_last(cfg.channels_last, dev) else None
    model.to(dev, memory_format=layout or torch.preserve_format)
    policy = masker = None
    if cfg.policy:
        policy = PolicyNet(grid=cfg.grid, in_chans=cfg.channels, trunk=cfg.policy_model)
        if run.init is not None and run.init.policy is not None:
            fit_policy(policy, run.init, log)
        policy.to(dev, memory_format=layout or torch.preserve_format)
        masker = make_masker(cfg.impl, cfg.grid, cfg.train_crop_size,
                             seed=cfg.seed + 1000 * info.rank).to(dev)
    if cfg.compile:
        compile_modules([model, policy], dev, log)
    if info.distributed:
        model = _distribute(model, cfg, info)
        policy = _distribute(policy, cfg, info) if policy is not None else None
    optimizer = build_optimizer(param_groups(unwrap(model), cfg.stem_lr_scale, cfg.weight_decay),
                                cfg, cfg.lr, dev, capturable=cfg.graphs and dev.type == "cuda")
    loss = dict(label_smoothing=cfg.label_smoothing, clip_grad_norm=cfg.clip_grad_norm)
    if policy is None:
        return Parts(model, optimizer, PlainStep(model, optimizer, cfg.amp, dev, **loss),
                     channels_last=layout is not None)
    # the policy always trains with SGD (docs/method.md §5)
    sgd = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, **sgd_kind(dev))
    policy_optimizer = torch.optim.SGD(policy_param_groups(
        unwrap(policy), cfg.policy_stem_lr_scale, cfg.effective_policy_lr(), cfg.weight_decay),
        lr=cfg.effective_policy_lr(), **sgd)
    step = HeatedStep(model, policy, masker, optimizer, policy_optimizer, cfg.amp, dev,
                      ema_sync=all_reduce_mean if info.distributed else None, **loss)
    val_masker = make_masker(cfg.impl, cfg.grid, cfg.val_crop_size, seed=cfg.seed + 1).to(dev)
    return Parts(model, optimizer, step, policy, masker, policy_optimizer, val_masker,
                 channels_last=layout is not None)


def _distribute(module, cfg, info):
    if cfg.sync_bn and info.device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ddp = dict(device_ids=[info.local_rank]) if info.device.type == "cuda" else {}
    return torch.nn.parallel.DistributedDataParallel(module, **ddp)


def _restore(run: Run, parts: Parts, log) -> tuple[int, int, float]:
    """Load a --resume checkpoint; returns (start_epoch, global_step, best_f1). Learning rates
    are not restored: the schedulers are rebuilt from the config at the resumed epoch."""
    s, cfg = run.resume_state, run.cfg
    if s is None:
        return 0, 0, -math.inf
    load_weights(unwrap(parts.model), s.model, "the --resume checkpoint")
    pairs = [(parts.optimizer, s.optimizer, cfg.lr)]
    if parts.policy is not None:
        load_weights(unwrap(parts.policy), s.policy, "the --resume checkpoint", "policy")
        if s.config.get("impl") == cfg.impl:  # same implementation: continue its mask stream
            parts.masker.load_state_dict(s.masker)
        pairs.append((parts.policy_optimizer, s.policy_optimizer, cfg.effective_policy_lr()))
    for optimizer, saved, lr in pairs:
        optimizer.load_state_dict(saved)  # momentum buffers
        reset_hyperparameters(optimizer, lr, cfg, run.info.device)
    if run.info.world_size == 1:
        torch.set_rng_state(s.rng)
    start_epoch = s.epoch + 1
    if start_epoch >= cfg.epochs:
        raise ConfigError(f"the run in {run.out} already finished its {cfg.epochs} epochs: "
                          f"raise --epochs to go on")
    log(f"resumed from epoch {s.epoch} (step {s.step}) of {run.out}")
    return start_epoch, s.step, s.best_f1


def _loaders(run: Run, log=print) -> tuple[BatchLoader, BatchLoader | None]:
    cfg, info = run.cfg, run.info
    common = dict(batch_size=cfg.batch_size, resize_size=cfg.val_resize_size,
                  channels=cfg.channels, workers=cfg.workers, device=info.device,
                  backend=cfg.loader, on_bad_image=cfg.on_bad_image, recheck=run.recheck,
                  log=log, **cfg.normalisation(),
                  channels_last=use_channels_last(cfg.channels_last, info.device))
    # static (DALI and device, for graph replay): every train batch lands in the same two
    # tensors (loader.buffers); without it DALI's own output buffers are yielded, no copy.
    # _graphed then moves the device loader's fill into the captured step (defer_fill)
    static = cfg.graphs and _graphs_blocked(info) is None
    train = make_loader(run.train_split, train=True, crop_size=cfg.train_crop_size, seed=cfg.seed,
                        rank=info.rank, world_size=info.world_size, static=static,
                        class_balanced=cfg.class_balanced, **common)
    # validation: every process scores its shard (each image once); a split smaller than the
    # number of processes is scored by rank 0 alone (val is None on the others)
    shards = info.world_size if len(run.val_split) >= info.world_size else 1
    val = make_loader(run.val_split, train=False, crop_size=cfg.val_crop_size,
                      rank=info.rank if shards > 1 else 0, world_size=shards,
                      **common) if shards > 1 or info.is_main else None
    return train, val


def intra_op_threads(cfg: TrainConfig, device: torch.device) -> tuple[int, str] | None:
    """CPU runs: ``(threads, why)``. ``--threads``, else :func:`default_threads`. Measured on a
    2-core machine with the tiny quick start (DALI's CPU loader, 2 workers): idle, 2 threads ran
    the heated stage in 116 s against 186 s with 1 (the loader needs little of the cores); busy
    with other jobs (load 8-16), 2 threads took 365-1,083 s against 126-148 s with 1 (torch's
    threads wait for cores the other jobs hold). None on a GPU (torch's default stays)."""
    if device.type != "cpu":
        return None
    if cfg.threads:
        return cfg.threads, "--threads"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return default_threads(len(os.sched_getaffinity(0)), local)


@functools.cache
def default_threads(cores: int, local: int) -> tuple[int, str]:
    """This process's share of ``cores`` (``local`` processes on the machine) less the cores
    other processes keep busy in it, truncated; at least 1. Busy: the share of the machine's CPU
    time other processes take now (:func:`busy_elsewhere`; the 1-minute load average over the
    CPUs where ``/proc`` is missing; the load average alone would still count a job that just
    ended, such as the install before the quick start's first run). Decided once per process,
    so that the later stages of ``compare`` do not count the load of the earlier ones."""
    share = max(1, cores // local)
    fraction = busy_elsewhere()
    if fraction is None:
        fraction = os.getloadavg()[0] / max(1, os.cpu_count() or cores)
    busy = min(fraction, 1.0) * share
    return max(1, share - int(busy)), (f"{share} core{'s' if share > 1 else ''}, {busy:.1f} of "
                                       f"them busy with other processes; --threads sets it")


def busy_elsewhere(window: float = 0.5, proc: str = "/proc") -> float | None:
    """The fraction of the machine's CPU time that other processes used over the next
    ``window`` seconds (``/proc/stat`` less this process's own time); None without ``/proc``."""
    def snap():
        with open(f"{proc}/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
        with open(f"{proc}/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks), ticks[3] + ticks[4], int(own[11]) + int(own[12])  # idle + iowait
    try:
        total0, idle0, mine0 = snap()
        time.sleep(window)
        total1, idle1, mine1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return max(0.0, (elapsed - (idle1 - idle0) - (mine1 - mine0)) / elapsed)


def _graphs_blocked(info: DistInfo) -> str | None:
    """Why --graphs cannot apply to this process (None: it can)."""
    if info.device.type != "cuda":
        return "--graphs: CUDA graphs need a GPU; running eagerly"
    if info.distributed:
        return "--graphs: single-GPU only in this version; under torchrun the step runs eagerly"
    return None


def _graphed(parts: Parts, train_loader: BatchLoader, run: Run, log):
    """The step as a CUDA graph (:mod:`pgnm_fast.graphs`) where --graphs can apply."""
    why_not = _graphs_blocked(run.info)
    if why_not is not None:
        log(why_not)
        return parts.step
    optimizers = [o for o in (parts.optimizer, parts.policy_optimizer) if o is not None]
    static = train_loader.static  # DALI / device fill the same two tensors
    # the device loader: its batch fill joins the step (augmentation inside the graph)
    defer = getattr(train_loader, "defer_fill", None) if static else None
    prologue = defer() if defer is not None else None
    log("--graphs: the step is captured as a CUDA graph after 3 eager steps"
        + (", reading the loader's static batch buffers" if static else "")
        + (", the loader's augmentation captured with it" if prologue is not None else ""))
    return GraphedStep(parts.step, optimizers, warmup=3, static_inputs=static,
                       prologue=prologue, log=log)


def _train(run: Run, log, show_progress) -> Path:
    cfg, info, dev = run.cfg, run.info, run.info.device
    torch.manual_seed(cfg.seed + info.rank)
    parts = _build(run, log)
    start_epoch, global_step, best_f1 = _restore(run, parts, log)
    schedulers = [build_lr_scheduler(parts.optimizer, cfg, start_epoch)]
    if parts.policy is not None:
        schedulers.append(build_policy_lr_scheduler(parts.policy_optimizer, cfg, start_epoch))
    train_loader, val_loader = _loaders(run, log)
    threads = intra_op_threads(cfg, dev)
    if threads is not None:
        torch.set_num_threads(threads[0])
        if run.resume_state is not None and threads[0] == run.resume_state.config.get("threads"):
            threads = (threads[0], "as the run it resumes; --threads sets it")
        # the count is recorded with the run: sums run in another order on another count of
        # threads, so a resumed run must keep it to end bit-identical to an uninterrupted one
        cfg = run.cfg = cfg.replace(threads=threads[0])
    step = _graphed(parts, train_loader, run, log) if cfg.graphs else parts.step
    averager = None
    if cfg.average_last:  # on every process: each validates its shard of the average
        averager = LastEpochsAverage(unwrap(parts.model), cfg.epochs, cfg.average_last)
        if run.resume_state is not None and run.resume_state.averaged is not None:
            averager.load_state_dict(run.resume_state.averaged, log)
    if info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(dict(dataclasses.asdict(cfg), data=str(run.data_root),
                               run_record=run_record()), run.out / "config.json")
    metrics_log = MetricsLog(run.out / "metrics.jsonl")
    if info.is_main:
        metrics_log.keep_until(start_epoch - 1)
    write = metrics_log.write if info.is_main else (lambda record: None)
    log(f"{cfg.stage}: {cfg.model} ({len(run.classes)} classes"
        + (f", {cfg.policy_model} policy, grid {cfg.grid}, {cfg.impl} mask step" if parts.policy else "")
        + f") on {dev}, {cfg.epochs} epochs of batch {cfg.batch_size}"
        + (f" x {info.world_size}" if info.distributed else "")
        + (f"\n  {threads[0]} intra-op thread{'s' if threads[0] > 1 else ''} ({threads[1]})"
           if threads is not None else "")
        + (f"\n  weights from {run.init_from}" if run.init_from else "")
        + f"\n  data: {len(run.train_split)} train / {len(run.val_split)} val images from "
          f"{run.data_root} through {train_loader.name}\n  run folder: {run.out}")
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
            log_step=lambda rec, lrs=lrs: write(dict(rec, **lrs)), masker=parts.masker,
            show_progress=show_progress and info.is_main, channels_last=parts.channels_last,
            log_line=log)
        images_seen += train_stats["images"] * info.world_size
        for scheduler in schedulers:
            scheduler.step()
        end_epoch(run, parts, val_loader, averager, progress, epoch, global_step, train_stats,
                  lrs, t_epoch, write, log, observer, show_progress)
        barrier(info)
    best_f1, best_epoch, last_val = progress.best_f1, progress.best_epoch, progress.last_val

    seconds = time.perf_counter() - t0
    if info.is_main and last_val is not None:
        best = f"best val f1_macro {best_f1:.4f}" + (f" (epoch {best_epoch})" if best_epoch is not None else "")
        log(f"{cfg.stage} stage done: {cfg.epochs - start_epoch} epochs, {global_step} steps, "
            f"{images_seen / max(seconds, 1e-9):.0f} img/s, {best}, final val top1 "
            f"{last_val['top1']:.4f}\n  -> {run.out / 'best.pt'}")
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
    state = _state(run, epoch, global_step, parts, progress.best_f1, last_val)
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


def save_epoch_states(state: RunState, out: Path, improved: bool,
                      write_record: Callable[[], None] = lambda: None) -> None:
    """The checkpoints of one epoch, in the order that keeps them consistent at any kill:
    ``best.pt`` when validation improved, the epoch's metrics record, then ``last.pt``. Until
    ``last.pt`` is replaced the run resumes at this epoch, replays it (bit for bit) and drops
    its record first (:meth:`MetricsLog.keep_until`); so ``best.pt`` never lags the best score
    ``last.pt`` records, and every saved epoch has its record."""
    if improved:
        run_state.save_run_state(state, out / "best.pt")
    write_record()
    run_state.save_run_state(state, out / "last.pt")


def _state(run: Run, epoch: int, global_step: int, parts: Parts, best_f1: float,
           val_metrics: dict) -> RunState:
    cfg = run.cfg
    state = RunState(
        stage=cfg.stage, epoch=epoch, step=global_step, model_name=cfg.model,
        num_classes=len(run.classes), in_chans=cfg.channels, classes=list(run.classes),
        model=unwrap(parts.model).state_dict(), optimizer=parts.optimizer.state_dict(),
        config=dataclasses.asdict(cfg), data=str(run.data_root), best_f1=best_f1,
        val_metrics=json_safe(val_metrics), rng=torch.get_rng_state())
    if parts.policy is not None:
        state.policy = unwrap(parts.policy).state_dict()
        state.policy_model = cfg.policy_model
        state.masker = parts.masker.state_dict()
        state.policy_optimizer = parts.policy_optimizer.state_dict()
    return state


def _validate(run: Run, model: torch.nn.Module, val_loader: BatchLoader | None,
              policy: torch.nn.Module | None = None, masker: torch.nn.Module | None = None,
              keep: list | None = None, show_progress: bool = False) -> dict | None:
    """Validation metrics of ``model`` on rank 0 (None on the others): every process with a
    loader scores its shard, rank 0 gathers the logits (see ``_loaders``) and appends
    (logits, labels) to the list ``keep`` if given."""
    scored = None
    if val_loader is not None:
        scored = predict(model, val_loader, run.info.device, run.cfg.amp, policy=policy,
                         masker=masker, show_progress=show_progress and run.info.is_main,
                         desc="validation",
                         channels_last=use_channels_last(run.cfg.channels_last, run.info.device))
    gathered = gather_to_main(scored, run.info)
    if keep is not None and gathered is not None:
        keep.extend(gathered)
    return classification_metrics(*gathered, run.classes)[0] if gathered is not None else None


def _save_average(run: Run, averager: LastEpochsAverage, parts: Parts, metrics: dict,
                  state: RunState, log) -> dict:
    """Write ``averaged.pt`` with its validation metrics; returns the metrics record."""
    path = run.out / "averaged.pt"
    run_state.save_run_state(dataclasses.replace(state, optimizer=None, averaged=None, rng=None,
                                       model=averager.model_state(unwrap(parts.model)),
                                       averaged_epochs=averager.epochs,
                                       val_metrics=json_safe(metrics)), path)
    log(f"averaged the weights of epochs {', '.join(map(str, averager.epochs))}: val "
        f"{format_val(metrics)}\n  -> {path}")
    return dict(kind="averaged", epochs=averager.epochs, val=json_safe(metrics))


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
