"""One training step per stage, one epoch loop, one evaluation loop (torchvision's split).

The steps keep their metrics on the device (a running sum tensor) and never call ``.item()``: the
epoch loop reads them every ``print_freq`` steps, together with the masker's non-finite flag.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .console import bar_fields, step_line
from .errors import ConfigError, PgnmError
from .objective import pgnm_loss

if TYPE_CHECKING:
    from .pipelines.contract import BatchLoader

# Running sums kept on the device: loss, ce, mean S, correct top-1, images, then the policy's
# movement (heated stage; 0 otherwise): mask spread x images, policy gradient norm, optimiser steps.
N_STATS = 8


class TrainingDiverged(PgnmError):
    """The policy produced NaN/inf parameters or the loss became non-finite."""

    exit_code = 3


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA or CPU (no loss scaling needed for bf16). The weight-cast cache is
    off, as CUDA-graph capture requires (each weight is cast once per forward anyway)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return module.module if hasattr(module, "module") else module


class HeatedStep:
    """docs/method.md §3-§5: policy -> a~, b~ -> sample + score -> mask -> classifier ->
    mean(S) * CE; one backward, both optimisers step, then the EMA of the policy's base buffers.

    ``reward_group``: the objective's reward group (:func:`~pgnm_fast.objective.pgnm_loss`).
    ``accum_steps`` k: each call is one micro-batch of an optimiser step over k micro-batches of
    equal size. The gradients add up (zeroed at the first micro-batch, each loss weighted by
    1 / k: the mean over all the reward groups of the k micro-batches), both optimisers step
    (after clipping) at the last one, and the base buffers then move once, by the mean of the
    heads over the k micro-batches (and over the ranks with ``ema_sync``). k = 1 is one batch
    per step. The micro-batch counter is Python-side; nothing reads the device."""

    def __init__(self, model: torch.nn.Module, policy: torch.nn.Module, masker: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, policy_optimizer: torch.optim.Optimizer,
                 amp: bool, device: torch.device,
                 ema_sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 label_smoothing: float = 0.0, clip_grad_norm: float = 0.0,
                 accum_steps: int = 1, reward_group: int | None = None):
        self.model, self.policy, self.masker = model, policy, masker
        self.optimizer, self.policy_optimizer = optimizer, policy_optimizer
        self.amp, self.device = amp, device
        self.ema_sync = ema_sync  # all-reduces the head means across ranks when distributed
        self.label_smoothing, self.clip_grad_norm = label_smoothing, clip_grad_norm
        self.accum = _Accumulation(accum_steps)
        self.reward_group = reward_group
        self._head_sums = None  # (sum h_a, sum h_b, images) over the micro-batches so far

    @property
    def accum_steps(self) -> int:
        return self.accum.steps

    def __call__(self, images: torch.Tensor, target: torch.Tensor, stats: torch.Tensor) -> None:
        first, last = self.accum.position()
        with autocast(self.device, self.amp):
            out = self.policy(images)
            m, S = self.masker.sample_score(out.a_tilde, out.b_tilde)
            logits = self.model(self.masker.apply(images, m))
        loss, ce = pgnm_loss(S, logits, target, self.label_smoothing, self.reward_group)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
            self.policy_optimizer.zero_grad(set_to_none=True)
        self.accum.scaled(loss).backward()
        h_a, h_b = self._head_means(out.h_a.detach(), out.h_b.detach(), first, last)
        grad_norm = None
        if last:
            clip_gradients(self.model, self.clip_grad_norm)
            grad_norm = clip_gradients(self.policy, self.clip_grad_norm, measure=True)
            self.optimizer.step()
            self.policy_optimizer.step()
            if self.ema_sync is not None:  # every rank moves its buffers by the global batch mean
                h_a = self.ema_sync(h_a.mean(0, keepdim=True))
                h_b = self.ema_sync(h_b.mean(0, keepdim=True))
            unwrap(self.policy).update_base(h_a, h_b)
        _accumulate(stats, loss, ce, S.detach().mean(), logits, target,
                    mask_spread(out.a_tilde.detach(), out.b_tilde.detach()), grad_norm)

    def _head_means(self, h_a, h_b, first, last):
        """The heads whose batch mean moves the bases: this batch's (k = 1), else at the last
        micro-batch the (1, G^2) means over the k micro-batches, summed in the bases' dtype into
        buffers kept from step to step (in place: the same memory under graph replay)."""
        if self.accum.steps == 1:
            return h_a, h_b
        dtype = unwrap(self.policy).base_alpha.dtype
        sums = [torch.sum(h, 0, keepdim=True, dtype=dtype) for h in (h_a, h_b)]
        if self._head_sums is None:  # the two head sums and the image count
            self._head_sums = [torch.zeros_like(s) for s in sums] + [sums[0].new_zeros(())]
        for buffer, s in zip(self._head_sums, sums):
            buffer.copy_(s) if first else buffer.add_(s)
        images = self._head_sums[2]  # counted in place: no tensor made per micro-batch
        images.fill_(h_a.shape[0]) if first else images.add_(h_a.shape[0])
        if not last:
            return None, None
        return (self._head_sums[0] / self._head_sums[2], self._head_sums[1] / self._head_sums[2])

    @property
    def nonfinite(self) -> torch.Tensor:
        """The masker's device-side flag: the policy produced a non-finite a~ or b~."""
        return self.masker.nonfinite


class PlainStep:
    """Baseline and fine-tune: cross-entropy on clean images, no policy. ``accum_steps`` as in
    :class:`HeatedStep`: k micro-batches per optimiser step, the mean CE over their images."""

    nonfinite = None  # no policy, no flag

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: bool,
                 device: torch.device, label_smoothing: float = 0.0,
                 clip_grad_norm: float = 0.0, accum_steps: int = 1):
        self.model, self.optimizer, self.amp, self.device = model, optimizer, amp, device
        self.label_smoothing, self.clip_grad_norm = label_smoothing, clip_grad_norm
        self.accum = _Accumulation(accum_steps)

    @property
    def accum_steps(self) -> int:
        return self.accum.steps

    def __call__(self, images: torch.Tensor, target: torch.Tensor, stats: torch.Tensor) -> None:
        first, last = self.accum.position()
        with autocast(self.device, self.amp):
            logits = self.model(images)
        ce = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        self.accum.scaled(ce).backward()
        if last:
            clip_gradients(self.model, self.clip_grad_norm)
            self.optimizer.step()
        _accumulate(stats, ce, ce, ce.new_zeros(()), logits, target)


class _Accumulation:
    """The micro-batch counter of gradient accumulation over ``steps`` micro-batches."""

    def __init__(self, steps: int):
        if int(steps) != steps or steps < 1:
            raise ConfigError(f"--accum-steps must be a positive whole number, not {steps}")
        self.steps, self.done = int(steps), 0

    def position(self) -> tuple[bool, bool]:
        """(first, last): whether this micro-batch starts and ends an optimiser step."""
        first, last = self.done == 0, self.done == self.steps - 1
        self.done = (self.done + 1) % self.steps
        return first, last

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step's loss (equal micro-batches: 1 / steps)."""
        return loss if self.steps == 1 else loss / self.steps


def clip_gradients(module, max_norm: float, measure: bool = False) -> torch.Tensor | None:
    """``--clip-grad-norm``: scale ``module``'s gradients to a total 2-norm of at most
    ``max_norm`` (0: off). All on the device, no host sync (CUDA-graph capturable); a non-finite
    norm is not raised here, the epoch loop's loss check stops the run. Returns the total 2-norm
    before clipping (a 0-d device tensor) when clipping, or when ``measure`` asks for it."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm, foreach=True,
                                              error_if_nonfinite=False)
    if not measure:
        return None
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None


def mask_spread(a_tilde: torch.Tensor, b_tilde: torch.Tensor) -> torch.Tensor:
    """How much the policy's masks differ between images: the standard deviation over the batch
    of each image's mean expected mask E[m] = alpha / (alpha + beta) = sigmoid(a~ - b~). 0 while
    the policy gives every image the same mask; a 0-d device tensor (no host sync)."""
    per_image = torch.sigmoid((a_tilde.float() - b_tilde.float()).flatten(1)).mean(1)
    return per_image.std(correction=0)


def _accumulate(stats, loss, ce, s_mean, logits, target, spread=None, grad_norm=None):
    """Add one micro-batch to the running sums (:data:`N_STATS`), on the device. ``spread`` and
    ``grad_norm`` (heated stage): the batch's :func:`mask_spread` and, at an optimiser step, the
    policy's gradient norm."""
    bs = target.shape[0]
    correct = (logits.detach().argmax(1) == target).sum()
    stats[:4] += torch.stack([loss.detach() * bs, ce.detach() * bs, s_mean * bs, correct.float()])
    stats[4] += bs
    if spread is not None:
        stats[5] += spread * bs
    if grad_norm is not None:
        stats[6] += grad_norm
        stats[7] += 1


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (images, target, stats)


def train_one_epoch(step: Step, loader: BatchLoader, device: torch.device, epoch: int,
                    global_step: int, print_freq: int, log_step: Callable[[dict], None],
                    show_progress: bool = True,
                    channels_last: bool = False, log_line: Callable[[str], None] | None = None,
                    accum_steps: int = 1) -> tuple[int, dict]:
    """Run one epoch; every ``print_freq`` steps read the device stats (one sync), check them and
    the step's non-finite flag (``step.nonfinite``, None without a policy), and hand a record to
    ``log_step``; where no live bar is drawn (output not a terminal) also print a step line
    through ``log_line``. With ``accum_steps`` k (the step's gradient accumulation) the epoch's
    last batches that do not fill an optimiser step of k are read but not trained on, so every
    epoch ends on a whole optimiser step. Returns (global_step, record)."""
    stats = torch.zeros(N_STATS, device=device)
    window = torch.zeros(N_STATS, device=device)
    bar = tqdm(total=len(loader) * loader.batch_size, unit="img", unit_scale=True, leave=False,
               desc=f"epoch {epoch}", disable=None if show_progress else True,  # None: TTY only
               mininterval=1.0)
    lines = show_progress and bar.disable and log_line is not None
    heated = step.nonfinite is not None
    t_window, first = time.perf_counter(), global_step
    t_start = t_window
    last = None
    batches = len(loader) - len(loader) % accum_steps
    for i, (images, target) in enumerate(loader):
        if i >= batches:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        step(images, target, window)
        global_step += 1
        bar.update(target.shape[0])
        if (i + 1) % print_freq == 0 or i + 1 == batches:
            last = _read_window(window, step.nonfinite, epoch, first, global_step, time.perf_counter() - t_window)
            log_step(last)
            bar.set_postfix(bar_fields(last, heated))
            if lines:
                log_line(step_line(last, i + 1, len(loader), time.perf_counter() - t_start, heated))
            stats += window
            window.zero_()
            t_window, first = time.perf_counter(), global_step
    bar.close()
    if last is None:
        raise PgnmError("the training loader yielded no batch: the train split is smaller than "
                        "one batch (lower --batch-size)")
    total = stats.tolist()
    n = max(total[4], 1.0)
    return global_step, {"loss": total[0] / n, "ce": total[1] / n, "S": total[2] / n,
                         "train_top1": total[3] / n, "images": int(total[4]),
                         **(policy_movement(total) if heated else {})}


def policy_movement(values: list[float]) -> dict:
    """The heated stage's record of whether the policy moves, from the running sums: the mean
    over the images of the batch :func:`mask_spread` (``mask_spread``) and the mean over the
    optimiser steps of the policy's gradient 2-norm before clipping (``policy_grad_norm``; None
    for a window without an optimiser step)."""
    steps = values[7]
    return {"mask_spread": values[5] / max(values[4], 1.0),
            "policy_grad_norm": values[6] / steps if steps else None}


def check_finite_weights(modules, epoch: int) -> None:
    """Raise :class:`TrainingDiverged` if a parameter of ``modules`` is NaN or infinite: the loss
    the epoch loop reads comes from before each update, so after the epoch's last update the
    weights themselves are checked (one host sync per epoch), before validation and saving."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise TrainingDiverged(f"training stopped at the end of epoch {epoch}: its last update "
                               f"made the weights non-finite; last.pt keeps the previous epoch "
                               f"(try a lower --lr)")


def _read_window(window, nonfinite, epoch, first, global_step, seconds):
    values = window.tolist()  # the one host sync of the window
    bad_policy = nonfinite is not None and bool(nonfinite)
    if bad_policy or not all(np.isfinite(values)):
        what = "the policy produced non-finite Beta parameters (a~ or b~)" if bad_policy \
            else "the loss became non-finite" if not all(np.isfinite(values[:5])) \
            else "the policy's gradient became non-finite"
        raise TrainingDiverged(f"training stopped at epoch {epoch}, steps {first + 1}-{global_step}: "
                               f"{what}; last.pt keeps the previous epoch (try a lower --lr)")
    n = max(values[4], 1.0)
    return {"kind": "step", "epoch": epoch, "step": global_step, "loss": values[0] / n,
            "ce": values[1] / n, "S": values[2] / n, "train_top1": values[3] / n,
            "img_s": values[4] / max(seconds, 1e-9),
            **(policy_movement(values) if nonfinite is not None else {})}


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device, amp: bool = False,
            policy: torch.nn.Module | None = None, masker: torch.nn.Module | None = None,
            show_progress: bool = False, desc: str = "eval",
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels over a loader. With ``policy`` and ``masker`` (heated stage)
    every batch is masked with masks drawn from the unconditional Beta(exp A_a, exp A_b)."""
    model.eval()
    outputs, labels = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, mininterval=1.0, unit="batch",
                               disable=None if show_progress else True):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            if policy is not None:
                a_tilde, b_tilde = unwrap(policy).unconditional(images.shape[0])
                m, _ = masker.sample_score(a_tilde, b_tilde)
                images = masker.apply(images, m)
            logits = model(images)
        outputs.append(logits.float().cpu())
        labels.append(target.cpu())
    model.train()
    return torch.cat(outputs).numpy(), torch.cat(labels).numpy()
