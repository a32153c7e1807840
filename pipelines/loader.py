"""The plain PyTorch loader: PIL decode and the transforms of docs/method.md §1 in
DataLoader workers.

The fallback where DALI is missing and the baseline of the pipeline benchmarks. Yields
``(images, labels)``: float32 ``[N, C, H, W]`` normalised, int64 ``[N]``.

Sampling and augmentation seeds: :mod:`.samplers` (train drops the last partial batch, so
every batch has the same shape; eval keeps every image). The same seed gives the same batches
from PNG files (:class:`ImageDataset`) and from a packed cache (:class:`CachedDataset`, pixels
read from the memory map).
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from pgnm_fast.errors import DataError

from .packed import PackedSplit
from .samplers import EvalShardSampler, split_key, train_sampler
from .split import Split
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


class CachedDataset(Dataset):
    """``(transform(grey image), label)`` for each record of a packed split, read from the
    memory map (an RGB cache becomes grey by PIL's luma, as ``load_grey`` does; with ``colour``
    RGB records stay RGB)."""

    def __init__(self, split, transform, colour: bool = False):
        self.cache, self.records, self.labels = split.cache, split.records, split.labels
        self.transform, self.colour = transform, colour

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        i, generator = split_key(key)
        a = self.cache.image(self.records[i])
        if a.shape[2] == 1:
            img = Image.fromarray(a[:, :, 0])
        else:
            img = Image.fromarray(a) if self.colour else Image.fromarray(a).convert("L")
        return self.transform(img, generator), int(self.labels[i])


def build_cached_loader(split: PackedSplit, *, train: bool, batch_size: int, crop_size: int = 224,
                        resize_size: int = 256, channels: int = 1, workers: int = 2,
                        seed: int = 0, rank: int = 0, world_size: int = 1,
                        device: torch.device | str | None = None,
                        mean: float = MEAN, std: float = STD,
                        class_balanced: bool = False,
                        channels_last: bool = False, uint8: bool | None = None) -> PlainLoader:
    """The plain loader over a packed split: :func:`~pgnm_fast.pipelines.loader.build_loader`'s
    sampling, seeding and batching (and its ``uint8`` rule), pixels from the cache instead of
    PNG files (so the same seed gives the same batches as from the files)."""
    uint8 = on_cuda(device) if uint8 is None else uint8
    colour = channels == 3 and keeps_colour(split)
    transform = build_transform(train, crop_size=crop_size, resize_size=resize_size,
                                channels=channels, mean=mean, std=std, uint8=uint8)
    dataset = CachedDataset(split, transform, colour=colour)
    return batch_loader(dataset, split.name, train=train, batch_size=batch_size, workers=workers,
                        seed=seed, rank=rank, world_size=world_size, device=device,
                        class_balanced=class_balanced, channels_last=channels_last,
                        normalise_on=(device or "cpu", mean, std) if uint8 else None)


def keeps_colour(split) -> bool:
    """Whether a 3-channel run reads ``split``'s RGB pixels as they are (a MedMNIST file's
    colour images, :mod:`.medmnist`); else colour becomes grey."""
    cache = getattr(split, "cache", None)
    return cache is not None and cache.channels == 3 and getattr(cache, "colour_input", False)


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
