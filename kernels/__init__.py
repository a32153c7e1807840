"""The PGNM mask step: the pure-PyTorch reference and the fused fast path.

``make_masker(impl, grid, crop_size, seed=0)`` gives the module the trainer's ``--impl`` names:
``"reference"`` (:class:`ReferenceMasker`, torch.distributions and upsample + blur) or ``"fast"``
(:class:`FastMasker`: Triton kernels on CUDA, the same math in plain torch on the CPU). Both have
``sample_score(a~, b~) -> (m, S)``, ``apply(images, m)`` and the device-side ``nonfinite`` flag.
"""
from __future__ import annotations

import torch

from pgnm_fast.names import IMPLS  # the CLI reads the names without importing torch

from .masker import FastMasker
from .reference import ReferenceMasker


def make_masker(impl: str, grid: int, crop_size, seed: int = 0) -> torch.nn.Module:
    """The masker of implementation ``impl`` ("reference" or "fast"); call ``.to(device)`` on it.

    ``seed`` starts the fast masker's own mask stream; the reference draws from torch's global
    generator (seed that with ``torch.manual_seed``)."""
    if impl == "reference":
        return ReferenceMasker(grid, crop_size)
    if impl == "fast":
        return FastMasker(grid, crop_size, seed=seed)
    from pgnm_fast.errors import ConfigError
    raise ConfigError(f"--impl {impl!r} is not one of {', '.join(IMPLS)}")


__all__ = ["FastMasker", "ReferenceMasker", "make_masker", "IMPLS"]
