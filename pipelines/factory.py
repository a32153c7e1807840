"""The one loader factory the trainer calls: DALI where it is installed, else the plain loader.

:func:`make_loader` takes a split (image files or a packed cache) or a data path, checks image
files before the first batch (:mod:`pgnm_fast.pipelines.check`; ``on_bad_image="error"`` names
the first bad file, ``"skip"`` leaves bad files out, logs the count and writes ``bad_list``),
and returns an iterable of ``(images, labels)`` with ``len()``, ``batch_size``, ``set_epoch``
and ``sampler.set_epoch`` (the trainer's loader contract, see ``pgnm_fast.engine``).

Backends: ``"dali"`` (:class:`~pgnm_fast.pipelines.dali.DaliLoader`, its GPU variant when
``device`` is a CUDA device, else its CPU-only variant), ``"torch"`` (the plain PyTorch loader of
:mod:`~pgnm_fast.pipelines.loader`; for a packed cache, the same loader reading the memory map),
``"device"`` (:class:`~pgnm_fast.pipelines.device.DeviceLoader`: a packed cache held in device
memory, augmented there; on the CPU, the same loader in host memory), ``"auto"``: the device
loader for a packed cache on CUDA when it fits in free device memory with a margin
(:func:`~pgnm_fast.pipelines.device.fits`), else DALI when it imports, else the plain loader,
saying which and why once per process.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from pgnm_fast.distributed import torchrun_env
from pgnm_fast.errors import ConfigError

from . import check, startup
from .contract import BatchLoader
from .loader import PlainLoader, batch_loader, build_loader, on_cuda, split_key
from .packed import PackedSplit
from .sources import Split, open_source
from .transforms import MEAN, STD, build_transform

BACKENDS = ("auto", "device", "dali", "torch")
_told = set()


def resolve_backend(backend: str = "auto", log: Callable[[str], None] = print) -> str:
    """``"dali"`` or ``"torch"`` for a requested backend (module docstring)."""
    from .dali import dali_available
    if backend not in BACKENDS:
        raise ConfigError(f"--loader must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend in ("torch", "device"):
        return backend
    if dali_available():
        return "dali"
    if backend == "dali":
        raise ConfigError("--loader dali: DALI is not installed (pip install "
                          "nvidia-dali-cuda120), or use --loader torch")
    if "fallback" not in _told:
        _told.add("fallback")
        log("DALI is not installed: data loading uses the plain PyTorch loader")
    return "torch"


class CachedDataset(Dataset):
    """``(transform(grey image), label)`` for each record of a packed split, read from the
    memory map (an RGB cache becomes grey by PIL's luma, as ``load_grey`` does)."""

    def __init__(self, split, transform):
        self.cache, self.records, self.labels = split.cache, split.records, split.labels
        self.transform = transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        i, generator = split_key(key)
        a = self.cache.image(self.records[i])
        img = Image.fromarray(a[:, :, 0]) if a.shape[2] == 1 else Image.fromarray(a).convert("L")
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
    dataset = CachedDataset(split, build_transform(train, crop_size=crop_size,
                                                   resize_size=resize_size, channels=channels,
                                                   mean=mean, std=std, uint8=uint8))
    return batch_loader(dataset, split.name, train=train, batch_size=batch_size, workers=workers,
                        seed=seed, rank=rank, world_size=world_size, device=device,
                        class_balanced=class_balanced, channels_last=channels_last,
                        normalise_on=(device or "cpu", mean, std) if uint8 else None)


def _torchrun_rank(rank, world_size):
    env = torchrun_env()
    return env.rank if rank is None else rank, env.world_size if world_size is None else world_size


def _device_or(backend, data, packed, train, device, rank, world_size, log) -> str:
    """``"device"`` where the device loader applies (module docstring), else
    :func:`resolve_backend`'s choice. ``--loader device`` with image files or with a cache too
    large for the device stops with one line giving both sizes."""
    if backend not in ("auto", "device"):
        return resolve_backend(backend, log)
    cuda = device is not None and torch.device(device).type == "cuda"
    if backend == "device" and not packed:
        raise ConfigError("--loader device reads a packed cache: run `pgnm-fast pack DATA --out "
                          "CACHE` and train on CACHE, or use --loader auto")
    if not packed or not cuda:
        return resolve_backend(backend, log)
    from .device import fits, resident_bytes
    resident = "shard" if world_size > 1 else "full"
    ok, words = fits(resident_bytes(data, train=train, rank=rank, world_size=world_size,
                                    resident=resident), device)
    if not ok and backend == "device":
        raise ConfigError(f"--loader device: the packed {data.name} split does not fit in device "
                          f"memory ({words}); use --loader dali or --loader auto")
    if ok:
        if ("device", data.name) not in _told:
            _told.add(("device", data.name))
            log(f"data loading: the {data.name} split of the packed cache resident in device "
                f"memory ({words})")
        return "device"
    if backend == "auto" and ("too large", data.name) not in _told:
        _told.add(("too large", data.name))
        log(f"the packed {data.name} split does not fit in device memory ({words}): "
            f"loading from the memory map instead")
    return resolve_backend("auto", log)


def make_loader(data: Split | str | os.PathLike, *, train: bool, batch_size: int, split: str | None = None,
                crop_size: int = 224, resize_size: int = 256, channels: int = 1,
                workers: int = 2, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, device: torch.device | str | None = None,
                backend: str = "auto", dtype: torch.dtype = torch.float32, channels_last: bool = False,
                static: bool = False,
                on_bad_image: str = "error", bad_list: str | os.PathLike | None = None,
                log: Callable[[str], None] = print, mean: float = MEAN, std: float = STD,
                class_balanced: bool = False, recheck: bool = False) -> BatchLoader:
    """A loader over ``data``: a Split (files or packed), or a data path with ``split`` (default
    ``train`` / ``val``). ``rank``/``world_size``: default from torchrun's environment.
    ``workers``: DataLoader processes (torch) or DALI CPU threads (0 means 1). ``dtype``,
    ``channels_last``, ``static``: output form (DALI and device; the plain loader yields
    float32, NHWC memory with ``channels_last``). ``mean``, ``std``: normalisation (RadImageNet's
    by default). ``class_balanced``: train order drawn with weight 1 / class count
    (:class:`~pgnm_fast.pipelines.loader.ClassBalancedSampler`; not with the device loader).
    """
    check.check_on_bad(on_bad_image)
    if not isinstance(data, Split):
        source = open_source(data, skip_bad=on_bad_image == "skip")
        data = source.split(split or ("train" if train else "val"))
        check.report_bad(source.problems, on_bad_image, None, log, what="entry")
    rank, world_size = _torchrun_rank(rank, world_size)
    packed = isinstance(data, PackedSplit)
    kind = _device_or(backend, data, packed, train, device, rank, world_size, log)
    scan = None
    if not packed:
        t0 = time.perf_counter()
        scan = startup.checked(data.files, data.root, rank=rank, world_size=world_size,
                               recheck=recheck, log=log)
        if time.perf_counter() - t0 > 5:
            log(f"checked {len(data.files)} image files in {time.perf_counter() - t0:.0f} s (a "
                f"cache made by `pgnm-fast pack` needs no check)")
        converted = int((scan.kind == check.CONVERT).sum())
        if kind == "dali" and converted:
            log(f"{converted} of {len(data.files)} {data.name} files are not 8-bit grey PNGs: PIL "
                f"decodes them for DALI on the fly (`pgnm-fast pack` decodes them once)")
        if scan.bad:
            check.report_bad([(data.files[i], r) for i, r in scan.bad], on_bad_image, bad_list,
                             log)
            keep = scan.good
            data = Split(data.name, [data.files[i] for i in keep], data.labels[keep],
                         data.classes, data.root)
            scan = check.ScanResult(data.files, scan.kind[keep], scan.height[keep],
                                    scan.width[keep], scan.colour[keep], scan.deep[keep],
                                    scan.nbytes[keep])
    common = dict(train=train, batch_size=batch_size, crop_size=crop_size,
                  resize_size=resize_size, channels=channels, seed=seed, rank=rank,
                  world_size=world_size, mean=mean, std=std)
    if kind == "device":
        if class_balanced and train:
            raise ConfigError("--class-balanced is not available with --loader device (its "
                              "epoch order is drawn on the device): use --loader dali or torch")
        from .device import DeviceLoader
        return DeviceLoader(data, **common, device=device, dtype=dtype,
                            channels_last=channels_last, static=static)
    common["class_balanced"] = class_balanced and train
    if kind == "dali":
        from .dali import DaliLoader
        dev = torch.device(device) if device is not None else None
        return DaliLoader(data, **common, device=dev if dev is not None and dev.type == "cuda"
                          else None, threads=max(1, workers), dtype=dtype,
                          channels_last=channels_last, static=static, scan=scan)
    build = build_cached_loader if packed else build_loader
    return build(data, **common, workers=workers, device=device, channels_last=channels_last)
