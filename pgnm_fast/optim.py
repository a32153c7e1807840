"""Optimisers and their learning-rate schedules, as torchvision's reference scripts build them:
the classifier's (``--opt sgd`` or ``adamw``, parameter groups for a summed stem), the policy's
(always SGD, docs/method.md §5), and the schedules stepped once per epoch.

Training a summed stem (:func:`param_groups`): with 3 identical input channels every channel's
weight gets the same gradient g, so the 3-channel stem's sum moves by ``lr * (3 g + wd * W)`` per
SGD step (momentum and Nesterov are linear, so the same holds for the buffers). Training the
summed 1-channel weight ``W`` with ``lr x 3`` and ``weight_decay / 3`` gives exactly that step;
under AdamW (decoupled decay ``W *= 1 - lr * wd``, update invariant to the gradient's scale) the
same two factors are exact too. Only ``--clip-grad-norm`` differs: the 3-channel model's norm
counts the stem gradient three times. ``--in-chans 3`` instead keeps the 3-channel stem and feeds
the grey image replicated (the authors' form).
"""
from __future__ import annotations

import warnings

import torch
from torch.optim import lr_scheduler as sched

from .errors import ConfigError
from .models import POLICY_TRUNK_PREFIX
from .models.resnet import FIRST_CONV
from .names import SCHEDULERS  # the CLI reads it from .names, without torch
from .speed import sgd_kind

STEM_LR_SCALE = 3.0  # a summed 3-channel stem (module docstring)


def _stem_name(model) -> str | None:
    params = dict(model.named_parameters())
    return next((f"{conv}.weight" for conv in FIRST_CONV.values()
                 if f"{conv}.weight" in params and params[f"{conv}.weight"].dim() == 4), None)


def param_groups(model, stem_lr_scale: float, weight_decay: float) -> list[dict]:
    """The optimiser's parameter groups: one, or with ``stem_lr_scale`` != 1 the stem weight in
    its own group with ``lr x s`` and ``weight_decay / s`` (module docstring). The group's
    ``lr_scale`` keeps the ratio when learning rates are reset on resume."""
    if stem_lr_scale == 1.0:
        return [dict(params=list(model.parameters()), lr_scale=1.0, weight_decay=weight_decay)]
    stem = _stem_name(model)
    params = dict(model.named_parameters())
    rest = [p for k, p in params.items() if k != stem]
    return [dict(params=rest, lr_scale=1.0, weight_decay=weight_decay),
            dict(params=[params[stem]], lr_scale=stem_lr_scale,
                 weight_decay=weight_decay / stem_lr_scale)]


def policy_param_groups(policy, stem_lr_scale: float, lr: float, weight_decay: float) -> list[dict]:
    """The policy optimiser's groups, each with its ``lr``, as :func:`param_groups` makes them
    (its trunk's stem apart when summed, ``stem_lr_scale`` != 1). ``policy``: not DDP-wrapped."""
    named = list(policy.named_parameters())
    stem = None if stem_lr_scale == 1.0 else POLICY_TRUNK_PREFIX + _stem_name(policy.fe)
    groups = [dict(params=[p for k, p in named if k != stem], lr_scale=1.0, weight_decay=weight_decay)]
    if stem is not None:
        groups.append(dict(params=[dict(named)[stem]], lr_scale=stem_lr_scale,
                           weight_decay=weight_decay / stem_lr_scale))
    return [dict(g, lr=lr * g["lr_scale"]) for g in groups]


def stem_lr_scales(w, channels: int) -> dict:
    """``stem_lr_scale`` and ``policy_stem_lr_scale`` of a run from the weights ``w``
    (:class:`~pgnm_fast.weights.Weights`) with ``channels``: a pgnm-fast checkpoint's own, and
    x3 for each 3-channel stem summed into a 1-channel run now."""
    saved = w.state.config if w.state is not None else {}
    scales = {k: saved[k] for k in ("stem_lr_scale", "policy_stem_lr_scale") if saved.get(k) is not None}
    stem = w.policy.get(f"{POLICY_TRUNK_PREFIX}{FIRST_CONV['resnet10t']}.weight") if w.policy else None
    for key, chans in (("stem_lr_scale", w.in_chans), ("policy_stem_lr_scale", stem is not None and stem.shape[1])):
        if channels == 1 and chans == 3:
            scales[key] = STEM_LR_SCALE
    return scales


def build_optimizer(params, cfg, lr: float, device: torch.device,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """``--opt sgd`` (momentum, coupled weight decay, the paper's; fused on CUDA, foreach
    elsewhere) or ``adamw``. Each group's lr is ``lr * lr_scale``. ``capturable``: AdamW's step
    counters stay on the device, as CUDA graph capture requires (SGD needs nothing)."""
    groups = [dict(g, lr=lr * g.get("lr_scale", 1.0)) for g in params]
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **sgd_kind(device))
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay,
                                 capturable=capturable)
    raise ConfigError(f"--opt must be sgd or adamw, not {cfg.opt!r}")


def build_policy_optimizer(policy, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The policy always trains with SGD at its own lr (docs/method.md §5), its summed stem in
    a group of its own (:func:`policy_param_groups`). ``policy``: not DDP-wrapped."""
    lr = cfg.effective_policy_lr()
    return torch.optim.SGD(policy_param_groups(policy, cfg.policy_stem_lr_scale, lr,
                                               cfg.weight_decay),
                           lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           **sgd_kind(device))


def reset_hyperparameters(optimizer, lr: float, cfg, device: torch.device) -> None:
    """After loading an optimiser's state on resume: the config's lr, momentum and weight decay,
    each group scaled by its ``lr_scale``, and SGD's form for this device (not the saved one)."""
    kind = sgd_kind(device) if isinstance(optimizer, torch.optim.SGD) else {}
    for group in optimizer.param_groups:
        group.pop("initial_lr", None)
        s = group.get("lr_scale", 1.0)
        group.update(lr=lr * s, weight_decay=cfg.weight_decay / s, **kind)
        if "momentum" in group:
            group["momentum"] = cfg.momentum


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
