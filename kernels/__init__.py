"""Mask-step implementations: the pure-PyTorch reference (and, with the kernels, the fast path)."""
from .reference import ReferenceMasker


def make_masker(impl: str, grid: int, crop_size, seed: int = 0):
    """The trainer's mask step: ``impl`` is ``reference`` (or ``fast`` once the kernels land)."""
    if impl == "reference":
        return ReferenceMasker(grid, crop_size)
    raise ValueError(f"--impl {impl!r} is not available in this build (use --impl reference)")
