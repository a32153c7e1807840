"""``--graphs``: the whole training step (forward, backward, both optimiser steps, the policy's
EMA and the device-side metrics) captured once as a CUDA graph and replayed every step (with
``--loader device``, the batch's augmentation too).

The steps of :mod:`pgnm_fast.engine` are written for this: no host sync, metrics summed into a
device tensor, the mask kernels' RNG seed and offset in a device tensor advanced by the kernel
(each replay draws fresh masks), the policy's base buffers updated in place. What capture
changes, handled here as PyTorch's CUDA-graph notes prescribe:

- warm-up: the first ``warmup`` steps run eagerly on the side stream the capture will use
  (autograd, the optimisers' momentum buffers, Triton's compilation, cuDNN's choices and the
  libraries' per-stream handles all settle before capture);
- static inputs: the graph reads one images and one labels tensor. Each batch is copied into
  them, unless it already is them (the DALI and device loaders' ``static`` buffers: no copy);
- a prologue: with ``--loader device`` the loader's batch fill (crop plan rows picked by a
  device-side counter, the resampling kernel, the labels; see
  :meth:`~pgnm_fast.pipelines.device.DeviceLoader.fill`) runs before the step, in the warm-up
  and eager steps and inside the captured function, so a replay is augmentation + step and the
  loader only hands over the buffers;
- constants: a captured SGD step keeps the learning rate, momentum and weight decay it was
  captured with, so a change of any of them (the per-epoch schedules) re-captures the step
  before the next replay. A batch of another shape runs eagerly;
- gradient accumulation (the steps' ``accum_steps`` k): one graph per micro-batch position,
  captured in a row at an optimiser step's first micro-batch (the first writes the gradients,
  the others add to the same tensors, the last steps the optimisers) and replayed in turn; the
  warm-up ends on a whole optimiser step, and the hyper-parameters are checked at its start;
- a capture that fails (an operation CUDA graphs cannot hold) is reported once and the run goes
  on eagerly, with nothing lost: capture records work but runs none of it.

Single process only in this version: under torchrun the stage runs eagerly and says so.
"""
from __future__ import annotations

import torch

from .errors import first_line


class _CudaGraphs:
    """Warm-up and capture on one side stream: cuBLAS and other libraries make their
    per-stream handles and workspaces during the warm-up, not in the middle of a capture."""

    def __init__(self):
        self._stream = None

    def stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def warm(self, fn):
        """Run ``fn`` eagerly on the side stream, joined to the current one before and after."""
        stream = self.stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn):
        """Record ``fn``'s CUDA work as a graph (nothing runs); returns the graph's replay."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's worker threads may call CUDA while this thread captures
        with torch.cuda.graph(graph, stream=self.stream(), capture_error_mode="thread_local"):
            fn()
        return graph.replay


class GraphedStep:
    """A step ``step(images, target, stats)`` (engine.HeatedStep or PlainStep) replayed as a
    CUDA graph (module docstring). ``optimizers``: the step's optimisers, whose hyper-parameters
    decide when to re-capture. ``static_inputs``: the tensors of the first captured batch become
    the graph's inputs (no copy for the loaders that yield the same two tensors every step; any
    other batch is copied into them); without it the graph gets inputs of its own.
    ``prologue``: a callable that fills those two tensors (the device loader's
    :meth:`~pgnm_fast.pipelines.device.DeviceLoader.fill`), run before every step and captured
    with it; it needs ``static_inputs``. ``capture`` and
    ``warm`` are injectable so the logic is testable without CUDA."""

    def __init__(self, step, optimizers, *, warmup: int = 3, static_inputs: bool = False,
                 prologue=None, log=print, capture=None, warm=None):
        if prologue is not None and not static_inputs:
            raise ValueError("a prologue fills the loader's static buffers: static_inputs=True")
        self.step, self.optimizers, self.warmup = step, list(optimizers), warmup
        self.static_inputs, self.prologue, self.log = static_inputs, prologue, log
        cuda = _CudaGraphs() if capture is None or warm is None else None
        self._capture = capture or cuda.capture
        self._warm = warm or cuda.warm
        self.replay = self.key = self.inputs = self.stats = None
        self.replays = []  # one graph per micro-batch position (engine's accum_steps)
        self.steps = self.captures = 0
        self.eager_reason = None

    @property
    def nonfinite(self):
        """The wrapped step's non-finite flag (engine.HeatedStep.nonfinite; None without one)."""
        return getattr(self.step, "nonfinite", None)

    def _hyper(self):
        return tuple((g["lr"], g.get("momentum"), g.get("weight_decay"), g.get("dampening"),
                      g.get("nesterov")) for o in self.optimizers for g in o.param_groups)

    def _run(self, images, target, stats):
        """One step as captured: the prologue (if any), then the step."""
        if self.prologue is not None:
            self.prologue()
        self.step(images, target, stats)

    def __call__(self, images, target, stats):
        self.steps += 1
        if self.prologue is not None and self.inputs is not None and (
                images is not self.inputs[0] or target is not self.inputs[1]):
            raise RuntimeError("a prologue fills the static buffers, but the step was handed "
                               "other tensors (a copy made after the loader yielded them?)")
        position = self._position()
        if self.eager_reason is not None or self.steps <= self.warmup or (
                self.replay is None and position != 0):  # warm-up ends on an optimiser step
            if self.eager_reason is None:
                return self._warm(lambda: self._run(images, target, stats))
            return self._run(images, target, stats)
        shape = (images.shape, images.stride(), images.dtype, target.shape, target.dtype)
        if self.replay is not None and shape != self.key[0]:
            return self._run(images, target, stats)  # an odd batch: eagerly, graph kept
        if self.inputs is None:
            self.inputs = (images, target) if self.static_inputs else (
                torch.empty_like(images), torch.empty_like(target))
            self.stats = torch.zeros_like(stats)
        static_images, static_target = self.inputs
        if images is not static_images:
            static_images.copy_(images, non_blocking=True)
        if target is not static_target:
            static_target.copy_(target, non_blocking=True)
        if position == 0 and (self.replay is None or self._hyper() != self.key[1]):
            if not self._recapture(shape):
                return self._run(images, target, stats)
        self.replays[position]()
        if getattr(self.step, "accum", None) is not None:
            self.step.accum.position()  # the replay ran no Python: move the counter on here
        stats += self.stats
        self.stats.zero_()

    def _position(self) -> int:
        """The micro-batch of the optimiser step the next call runs (0 without accumulation)."""
        accum = getattr(self.step, "accum", None)
        return accum.done if accum is not None else 0

    def _recapture(self, shape) -> bool:
        """Capture one graph per micro-batch position of gradient accumulation (one without):
        the first zeroes the gradients and writes them, the next ones add to those same
        tensors, the last steps the optimisers. Captured in a row at position 0; none runs."""
        self.replay, self.replays = None, []  # drop the old graphs (and their memory) first
        for optimizer in self.optimizers:  # backward allocates the grads inside the graph
            optimizer.zero_grad(set_to_none=True)
        accum = getattr(self.step, "accum", None)
        try:
            for _ in range(accum.steps if accum is not None else 1):
                self.replays.append(self._capture(lambda: self._run(*self.inputs, self.stats)))
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly instead
            self.replays = []
            if accum is not None:
                accum.done = 0  # nothing ran: the eager step starts the optimiser step again
            reason = first_line(e)
            self.eager_reason = reason
            self.log(f"--graphs: capturing the step failed ({reason[:200]}); running eagerly")
            return False
        self.replay = self.replays[0]
        self.key = (shape, self._hyper())
        self.captures += 1
        return True
