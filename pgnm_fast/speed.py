"""Speed settings of the training step, with timm's flag names: ``--channels-last``,
``--compile``, plus what needs no flag: cuDNN autotuning on CUDA and a fused (CUDA) or foreach
(CPU) SGD.

Each applies where it can. Where it cannot (``--compile`` without a compiler for the device), one
line says so and the run goes on without it. ``--compile`` and ``--graphs`` do not compose in this
version: the step's CUDA graph would capture torch.compile's generated code and its guards, which
this project has not verified, so the pair is refused with one line (choose one).
"""
from __future__ import annotations

import shutil

import torch

from .errors import ConfigError

COMPILE_WITH_GRAPHS = ("--compile and --graphs do not compose in this version: use --graphs "
                       "(the whole step as one CUDA graph) or --compile --no-graphs")


def check_flags(compile: bool, graphs: bool) -> None:
    """The refused combination, before anything runs."""
    if compile and graphs:
        raise ConfigError(COMPILE_WITH_GRAPHS)


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
            why_not = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
