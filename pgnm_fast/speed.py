"""Speed settings of the training step, with timm's flag names: ``--channels-last``,
``--compile``, plus what needs no flag: cuDNN autotuning on CUDA and a fused (CUDA) or foreach
(CPU) SGD.

What depends on the device (CUDA graphs, channels-last, static batch buffers) is decided once
per stage, into an :class:`ExecutionPlan` that the model, the loaders and the step receive.
Each setting applies where it can. Where it cannot (``--compile`` without a compiler for the
device), one line says so and the run goes on without it. ``--compile`` and ``--graphs`` do not compose in this
version: the step's CUDA graph would capture torch.compile's generated code and its guards, which
this project has not verified, so the pair is refused with one line (choose one).
"""
from __future__ import annotations

import dataclasses
import shutil

import torch

from .errors import ConfigError, first_line

COMPILE_WITH_GRAPHS = ("--compile and --graphs do not compose in this version: use --graphs "
                       "(the whole step as one CUDA graph) or --compile --no-graphs")


def check_flags(compile: bool, graphs: bool) -> None:
    """The refused combination, before anything runs."""
    if compile and graphs:
        raise ConfigError(COMPILE_WITH_GRAPHS)


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How this process runs a stage, decided once (:func:`plan_execution`).

    ``graphs``: the step is captured as a CUDA graph (:mod:`pgnm_fast.graphs`); ``graphs_blocked``
    says why not where ``--graphs`` was asked for. ``channels_last``: NHWC model and batches, laid
    out by the loaders. ``static_buffers``: the train loader fills the same two tensors every
    batch where it can (DALI, device), which the graph then reads without a copy."""
    graphs: bool = False
    channels_last: bool = False
    static_buffers: bool = False
    graphs_blocked: str | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format


def plan_execution(cfg, device: torch.device, distributed: bool = False) -> ExecutionPlan:
    """The plan for ``cfg`` on ``device`` (``distributed``: under torchrun)."""
    blocked = graphs_blocked(device, distributed) if cfg.graphs else None
    graphs = cfg.graphs and blocked is None
    return ExecutionPlan(graphs=graphs, channels_last=use_channels_last(cfg.channels_last, device),
                         static_buffers=graphs, graphs_blocked=blocked)


def graphs_blocked(device: torch.device, distributed: bool) -> str | None:
    """Why --graphs cannot apply to this process (None: it can)."""
    if device.type != "cuda":
        return "--graphs: CUDA graphs need a GPU; running eagerly"
    if distributed:
        return "--graphs: single-GPU only in this version; under torchrun the step runs eagerly"
    return None


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """``--channels-last``: NHWC model and batches. Default (None): on for CUDA, where cuDNN's
    bf16 convolutions run NHWC natively; off on the CPU (bench/bench_step.py measures both)."""
    return device.type == "cuda" if requested is None else bool(requested)


def compile_blocked(device: torch.device) -> str | None:
    """Why torch.compile cannot run on ``device`` here (None: it can)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  - inductor's GPU code generator
        except ImportError:
            return "torch.compile needs triton for a CUDA device (pip install triton)"
        return None
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "torch.compile needs a C++ compiler (g++ or clang++) for the CPU"
    return None


def compile_modules(modules, device: torch.device, log=print) -> bool:
    """``--compile``: each module compiled in place (``nn.Module.compile``: its type and state
    dict keys stay the same, so checkpoints do not change). Returns whether it applied."""
    why_not = compile_blocked(device)
    if why_not is None:
        try:
            for module in modules:
                if module is not None:
                    module.compile()
        except Exception as e:  # noqa: BLE001 - e.g. an unsupported Python for dynamo
            why_not = first_line(e)
    if why_not is not None:
        log(f"--compile: {why_not[:200]}; running without")
        return False
    log("--compile: classifier and policy compiled by torch.compile (the first steps compile)")
    return True


def sgd_kind(device: torch.device) -> dict:
    """SGD's multi-tensor form for the device: fused on CUDA, foreach elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def set_backends(device: torch.device) -> None:
    """cuDNN picks the fastest convolution for each shape (the train shapes are fixed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
