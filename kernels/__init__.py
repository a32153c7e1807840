"""The Triton kernels, each beside its pure-PyTorch reference, and the checks that hold them to it.

The PGNM mask step (``--impl``):

- :mod:`.reference`: the mask step in plain PyTorch (torch.distributions, upsample + blur), the
  reference every fast path is checked against;
- :mod:`.sample_score`, :mod:`.mask_apply` (with :mod:`.mask_plan`, the apply's per-axis bands, and
  :mod:`.special`, lgamma / digamma / log1p in plain ``tl`` arithmetic): the fused kernels, the same
  math in plain torch for the CPU, and their autograd glue;
- :mod:`.masker`: :class:`FastMasker`, the module on the fused kernels.
  ``make_masker(impl, grid, crop_size, seed=0)`` gives the module the trainer's ``--impl`` names:
  ``"reference"`` (:class:`ReferenceMasker`) or ``"fast"`` (:class:`FastMasker`: Triton kernels on
  CUDA, the same math in plain torch on the CPU). Both have ``sample_score(a~, b~) -> (m, S)``,
  ``apply(images, m)`` and the device-side ``nonfinite`` flag.

The data kernel: :mod:`.resized_crop`, the device loader's (``--loader device``) crop, PIL-exact
bilinear resize, flip and normalisation in one pass; its torch version and the dispatch between
them are in :mod:`pgnm_fast.pipelines.augment`.

Checks: :mod:`.checks`, the statistics and error bounds of the fast mask step against the
reference (the kernel tests and ``pgnm-fast validate``); :mod:`.compile_check`, every kernel variant
compiled for NVIDIA targets without a GPU (``python -m pgnm_fast.kernels.compile_check``).
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
