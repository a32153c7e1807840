"""The global batch as the unit of a run's optimisation, as in timm.

Each preset stage states its global batch (images per optimiser step, over every process and
every accumulation step) and the learning rate for it (``lr_base`` at ``lr_base_size`` images).
A run resolves, for the number of processes it has:

- the per-process batch (``batch_size``, the micro-batch): by default global / processes;
- the gradient accumulation (``accum_steps``): global / (per-process x processes), so a smaller
  ``--batch-size`` still gives each optimiser step the global batch;
- the learning rate: ``--lr`` where given, else ``lr_base`` scaled to the global batch
  (``lr_base_scale``: linear by default, as timm, or sqrt).

A warm-up as long as the run (``lr_warmup_epochs >= epochs``) would never reach the peak
learning rate: it is shortened to ``epochs - 1`` with one line. No torch import here.
"""
from __future__ import annotations

import math

from .errors import ConfigError


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def resolve_batch(values: dict, world_size: int) -> dict:
    """``values`` (the settings) with ``batch_size``, ``accum_steps`` and ``lr`` derived where
    they are None; one line when the global batch is not per-process x processes x accumulation
    steps, or the reward group does not divide the per-process batch."""
    g, b, k = values["global_batch"], values.get("batch_size"), values.get("accum_steps")
    procs = _plural(world_size, "process")
    if b is None:
        k = k or 1
        if g % (world_size * k):
            raise ConfigError(f"--global-batch {g} is not a whole number of images per process "
                              f"over {procs} x --accum-steps {k}: choose a --global-batch that "
                              f"{world_size * k} divides")
        b = g // (world_size * k)
    elif k is None:
        k = max(g // (b * world_size), 1)
    if b * world_size * k != g:
        raise ConfigError(f"--global-batch {g} is not --batch-size {b} x {procs} x --accum-steps "
                          f"{k} (= {b * world_size * k}): choose a --batch-size that divides "
                          f"{g // world_size if g % world_size == 0 else g} or set "
                          f"--global-batch {b * world_size * k}")
    group = values.get("reward_group")
    if values.get("stage") == "heated" and group is not None and b % group:
        raise ConfigError(f"--reward-group {group} must divide the per-process batch {b} (the "
                          f"reward groups are cut from each micro-batch)")
    lr = values.get("lr")
    if lr is None:
        ratio = g / values["lr_base_size"]
        lr = values["lr_base"] * (math.sqrt(ratio) if values["lr_base_scale"] == "sqrt"
                                  else ratio)
    return dict(values, batch_size=b, accum_steps=k, lr=lr)


def shorten_warmup(values: dict, log=None) -> dict:
    """``values`` with a warm-up as long as the run or longer shortened to ``epochs - 1``
    (said in one line through ``log``)."""
    warmup, epochs = values["lr_warmup_epochs"], values["epochs"]
    if warmup < epochs:
        return values
    if log is not None:
        log(f"--lr-warmup-epochs {warmup} shortened to {epochs - 1}: a warm-up as long as the "
            f"{epochs}-epoch run would never reach the peak lr")
    return dict(values, lr_warmup_epochs=epochs - 1)


def rebase(stored: dict, overrides: dict, world_size: int) -> dict:
    """A resumed or reused run's settings with ``overrides``: what depends on a changed setting
    is derived again (the per-process batch and accumulation for another global batch or number
    of processes, the lr for another global batch)."""
    values = dict(stored, **overrides)
    given = set(overrides)
    if "global_batch" in given and "lr" not in given:
        values["lr"] = None
    if "batch_size" in given and "accum_steps" not in given:
        values["accum_steps"] = None
    elif "accum_steps" in given and "batch_size" not in given:
        values["batch_size"] = None
    elif not given & {"batch_size", "accum_steps"}:
        b, k = values.get("batch_size"), values.get("accum_steps")
        if b is None or k is None or b * k * world_size != values["global_batch"]:
            values["batch_size"] = values["accum_steps"] = None
    return values


def _num(x: float) -> str:
    """3 significant digits, an exponent below 1e-3 (``3.91e-4``)."""
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def batch_line(cfg, world_size: int) -> str:
    """``global batch 256 = 32 per process x 1 process x 8 accumulation steps; lr 0.1 (3.9e-4 per
    image, the preset's)``."""
    steps = "accumulation step" + ("" if cfg.accum_steps == 1 else "s")
    preset = cfg.lr_base / cfg.lr_base_size
    same = math.isclose(cfg.lr_per_image, preset, rel_tol=1e-6)
    return (f"global batch {cfg.global_batch} = {cfg.batch_size} per process x "
            f"{_plural(world_size, 'process')} x {cfg.accum_steps} {steps}; lr {_num(cfg.lr)} "
            f"({_num(cfg.lr_per_image)} per image, "
            + ("the preset's)" if same else f"preset {_num(preset)})"))


def norm_line(cfg, world_size: int, sync: bool) -> str:
    """Where BatchNorm differs from the authors' (SyncBatchNorm over the global batch); ``sync``:
    SyncBatchNorm runs across the processes (torchrun on CUDA with --sync-bn)."""
    if world_size > 1 and sync:
        over = cfg.batch_size * world_size
        where = f"SyncBatchNorm across the {world_size} processes, over {over} images"
    elif world_size > 1:
        over = cfg.batch_size
        where = f"BatchNorm per process, over {over} images"
    else:
        over = cfg.batch_size
        where = f"BatchNorm over {over} images"
    if over == cfg.global_batch:
        return f"{where}: the global batch, as the authors' SyncBatchNorm"
    return (f"{where} at a time; the authors' SyncBatchNorm: the global batch of "
            f"{cfg.global_batch}")


def reward_lines(cfg) -> str:
    """The reward groups, and the classifier's effective step at the start of a heated run: its
    CE gradient is multiplied by mean S, about log(G^2) before the policy has learnt."""
    s = math.log(cfg.grid ** 2)
    return (f"reward groups of {cfg.reward_group or cfg.batch_size} images (the objective: the "
            f"mean over groups of mean(S) x CE)\n  effective classifier step at the start about "
            f"log(G^2) x lr = {s:.2f} x {_num(cfg.lr)} = {_num(s * cfg.lr)} (estimated; S is "
            f"logged)")


__all__ = ["resolve_batch", "shorten_warmup", "rebase", "batch_line", "norm_line", "reward_lines"]
