"""The loader contract: what the stages need from any loader (the DALI loader, the plain PyTorch
loader, and loaders to come). Code that drives a loader reads only these names."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchLoader(Protocol):
    """Yields ``(images, labels)`` batches; ``len()`` batches per epoch.

    ``static``: every batch lands in the same two tensors (``buffers``, set after the first
    batch), so a captured CUDA graph can read them without a copy. A static loader may also
    offer ``defer_fill()`` (the device loader): its batches are then filled by the callable it
    returns, which the graphed step runs and captures with the step. ``name``: how the start line
    of a run names the loader."""

    batch_size: int
    static: bool
    buffers: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def name(self) -> str: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` (train); the same epoch gives the same order."""
