"""Learning-rate schedules, stepped once per epoch as in torchvision's reference scripts."""
from __future__ import annotations

import warnings

from torch.optim import lr_scheduler as sched

from .errors import ConfigError
from .names import SCHEDULERS  # the CLI reads it from .names, without torch


def fast_forward(scheduler, epochs: int):
    """Step a fresh scheduler to ``epochs``: on resume the schedule is a function of the config
    and the epoch, so a run resumed with more ``--epochs`` follows the new schedule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(epochs):
            scheduler.step()
    return scheduler


def build_lr_scheduler(optimizer, cfg, start_epoch: int = 0):
    """Classifier: optional linear warm-up from ``lr * lr_warmup_decay`` over ``lr_warmup_epochs``,
    then step decay (``lr_step_size``, ``lr_gamma``), cosine to 0, or constant."""
    main_epochs = max(cfg.epochs - cfg.lr_warmup_epochs, 1)
    if cfg.lr_scheduler == "steplr":
        main = sched.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_epochs)
    elif cfg.lr_scheduler == "constant":
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ConfigError(f"unknown --lr-scheduler {cfg.lr_scheduler!r} (choose from {', '.join(SCHEDULERS)})")
    if cfg.lr_warmup_epochs > 0:
        warmup = sched.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay,
                                total_iters=cfg.lr_warmup_epochs)
        main = sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.lr_warmup_epochs])
    return fast_forward(main, start_epoch)


def build_policy_lr_scheduler(optimizer, cfg, start_epoch: int = 0):
    """Policy: cosine from its lr to 0 over the stage's epochs (docs/method.md §5)."""
    return fast_forward(sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs), start_epoch)
