"""The plain PyTorch loader: PIL decode and the transforms of docs/method.md §1 in
DataLoader workers.

The fallback where DALI is missing and the baseline of the pipeline benchmarks. Yields
``(images, labels)``: float32 ``[N, C, H, W]`` normalised, int64 ``[N]``.

Sampling:

- Train: an :class:`EpochSampler` (a ``DistributedSampler`` with ``num_replicas=world_size``,
  also for one process) shuffles by ``(seed, epoch)``, and the loader drops the last partial
  batch, so every batch has the same shape. Call ``loader.sampler.set_epoch(epoch)`` at the start
  of each epoch (resuming at epoch e then replays epoch e's order); if it is not called, each new
  pass over the loader moves to the next epoch by itself, so no two epochs repeat an order.
  Across ranks the sampler pads, as ``DistributedSampler`` does: the permutation is extended by
  its own first ``ceil(N / world_size) * world_size - N`` indices, so those few images are seen
  twice per epoch.
- Eval: no shuffle, every image kept (no ``drop_last``). With ``world_size > 1`` an
  :class:`EvalShardSampler` gives rank r the indices ``r, r + world_size, ...``: each image
  exactly once over all ranks, no padding, so shard lengths differ by at most one (gather the
  results with a size-aware collective, or pad them yourself).

Augmentation randomness: every train sample's draws come from a torch generator seeded by
:func:`sample_seeds` from ``(seed, rank, epoch, sample index)`` alone (the
train sampler hands each index its seed), so a batch is the same whatever the number
of workers, whether the workers persist across epochs, and in a run resumed at any epoch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from pgnm_fast.errors import DataError

from .sources import Split
from .transforms import MEAN, STD, build_transform, load_grey, normalise


class ImageDecodeError(DataError):
    """A file that cannot be decoded (one line naming it, also when raised in a worker)."""


class ImageDataset(Dataset):
    """``(transform(grey image), label)`` for each file of a :class:`Split`."""

    def __init__(self, split: Split, transform):
        self.files, self.labels, self.transform = split.files, split.labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, generator = split_key(key)
        try:
            img = load_grey(self.files[i])
        except DataError as e:
            raise ImageDecodeError(str(e)) from None
        return self.transform(img, generator), int(self.labels[i])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed and epoch) that moves to the next epoch by
    itself when ``set_epoch`` was not called between two passes."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, keyed=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self._passes, self._epoch_set = 0, False
        self.keyed = keyed  # yield (index, augmentation seed) pairs (:func:`sample_seeds`)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_set = True

    def __iter__(self):
        # A generator: a multi-worker DataLoader calls iter() twice on its first pass and drops
        # one of them unstarted, so the epoch is decided on the first next(), not on iter().
        if self._passes and not self._epoch_set:
            self.epoch += 1
        self._passes, self._epoch_set = self._passes + 1, False
        if not self.keyed:
            yield from self._indices()
            return
        indices = list(self._indices())
        yield from zip(indices, sample_seeds(self.seed, self.rank, self.epoch, indices).tolist())

    def _indices(self):
        return DistributedSampler.__iter__(self)


class ClassBalancedSampler(EpochSampler):
    """Class-balanced training order (``--class-balanced``): each epoch draws as many indices as
    :class:`EpochSampler` gives, with replacement, image i with weight ``1 / count(label_i)``,
    so every class is drawn equally often in expectation. The draw is a function of ``(seed,
    epoch)``, the same on every rank; rank r takes every ``num_replicas``-th index from r."""

    def __init__(self, labels, num_replicas=1, rank=0, seed=0, keyed=False):
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        super().__init__(range(len(labels)), num_replicas=num_replicas, rank=rank, seed=seed,
                         keyed=keyed)
        self.weights = 1.0 / torch.bincount(labels).double()[labels]

    def _indices(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(drawn[self.rank:self.total_size:self.num_replicas].tolist())


def train_sampler(labels, num_replicas: int, rank: int, seed: int, class_balanced: bool = False,
                  keyed: bool = False):
    """The training sampler of both backends: shuffled epochs, or class-balanced draws;
    ``keyed``: with each index its augmentation seed (the plain loader's datasets)."""
    if class_balanced:
        return ClassBalancedSampler(labels, num_replicas=num_replicas, rank=rank, seed=seed,
                                    keyed=keyed)
    return EpochSampler(range(len(labels)), num_replicas=num_replicas, rank=rank, seed=seed,
                        keyed=keyed)


def sample_seeds(seed: int, rank: int, epoch: int, indices) -> np.ndarray:
    """One uint64 generator seed per sample index, a pure function of ``(seed, rank, epoch,
    index)``: SplitMix64's finaliser over a per-epoch base drawn by numpy's SeedSequence."""
    base = np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0]
    z = base + (np.asarray(indices, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_key(key):
    """``(index, generator)`` from what a sampler yields: an index (no augmentation draws,
    evaluation) or ``(index, seed)`` from a keyed :class:`EpochSampler`."""
    if isinstance(key, tuple):
        return key[0], torch.Generator().manual_seed(key[1])
    return key, None


class EvalShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` in order: each index once over all ranks."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # same order every epoch; here for a uniform API
        pass


def build_loader(split: Split, *, train: bool, batch_size: int, crop_size: int = 224,
                 resize_size: int = 256, channels: int = 1, workers: int = 2, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None,
                 device: torch.device | str | None = None, mean: float = MEAN,
                 std: float = STD, class_balanced: bool = False,
                 channels_last: bool = False, uint8: bool | None = None) -> PlainLoader:
    """A DataLoader over ``split`` (module docstring for sampling and seeding).

    ``device``: where the batches will go; a CUDA device turns on pinned memory.
    ``drop_last``: None means True for train, False for eval.
    ``channels_last``: the workers hand NHWC batches (the step then needs no copy).
    ``uint8`` (default: on a CUDA device): the workers hand uint8 batches, a quarter of the
    bytes, which the loader moves to ``device`` and normalises there
    (:func:`~.transforms.normalise`, the same float32 values); else CPU float32 batches.
    """
    uint8 = on_cuda(device) if uint8 is None else uint8
    transform = build_transform(train, crop_size=crop_size, resize_size=resize_size,
                                channels=channels, mean=mean, std=std, uint8=uint8)
    return batch_loader(ImageDataset(split, transform), split.name, train=train,
                        batch_size=batch_size, workers=workers, seed=seed, rank=rank,
                        world_size=world_size, drop_last=drop_last, device=device,
                        class_balanced=class_balanced, channels_last=channels_last,
                        normalise_on=(device or "cpu", mean, std) if uint8 else None)


def on_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class PlainLoader(DataLoader):
    """The PyTorch DataLoader with the loader contract (:class:`~.contract.BatchLoader`): it
    yields fresh tensors (never static buffers): CPU float32, or with ``normalise_on`` =
    (device, mean, std) the workers' uint8 batches moved to that device and normalised there."""

    static = False
    buffers = None
    normalise_on = None

    def __iter__(self):
        batches = super().__iter__()
        if self.normalise_on is None:
            return batches
        device, mean, std = self.normalise_on
        return ((normalise(x.to(device, non_blocking=True), mean, std), y) for x, y in batches)

    @property
    def name(self) -> str:
        return "the PyTorch DataLoader"

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # the eval shards keep one order


def batch_loader(dataset: Dataset, name: str, *, train: bool, batch_size: int, workers: int, seed: int,
                 rank: int, world_size: int, drop_last: bool | None = None,
                 device: torch.device | str | None = None,
                 class_balanced: bool = False,
                 channels_last: bool = False, normalise_on: tuple | None = None) -> PlainLoader:
    """Sampling, seeding and batching of a map-style dataset (module docstring), shared by the
    PNG files and the packed cache, so both give the same batches for the same seed.
    ``normalise_on``: (device, mean, std) for a dataset of uint8 images (PlainLoader)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if train:
        sampler = train_sampler(dataset.labels, world_size, rank, seed, class_balanced,
                                keyed=True)
        per_rank = math.ceil(len(dataset) / world_size)
        if per_rank < batch_size and (drop_last is None or drop_last):
            raise DataError(f"the {name} split has {len(dataset)} images, fewer than one "
                            f"batch of {batch_size} per process ({world_size} processes)")
    else:
        sampler = EvalShardSampler(len(dataset), world_size, rank)
    pin = on_cuda(device)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    loader = PlainLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                         drop_last=train if drop_last is None else drop_last, pin_memory=pin,
                         persistent_workers=workers > 0, generator=generator,
                         collate_fn=collate_channels_last if channels_last else None)
    loader.normalise_on = normalise_on
    return loader


def collate_channels_last(batch):
    """The default batch, its images in NHWC memory (made in the worker; pinning keeps it)."""
    images, labels = default_collate(batch)
    return images.contiguous(memory_format=torch.channels_last), labels
