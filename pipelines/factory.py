"""The one loader factory the trainer calls: DALI where it is installed, else the plain loader.

:func:`make_loader` takes a split (image files or a packed cache) or a data path, checks image
files before the first batch (:mod:`pgnm_fast.pipelines.check`; what becomes of a bad file:
:mod:`pgnm_fast.pipelines.badfiles`), and returns a :class:`~.contract.BatchLoader` built by
the entry of ``LOADERS`` its name picks (a new loader is one more entry there).

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

import numpy as np
import torch

from pgnm_fast.distributed import torchrun_env
from pgnm_fast.errors import ConfigError

from . import badfiles, check, startup
from .badfiles import check_on_bad, drop_bad, report_bad
from .contract import BatchLoader
from .loader import build_cached_loader, build_loader, keeps_colour
from .packed import PackedSplit
from .sources import Split, open_source
from .transforms import MEAN, STD

_told = set()


# ----------------------------------------------------------------------------- the loaders
# name -> build(data, **options) -> BatchLoader. Every build takes the same keyword options
# (those :func:`make_loader` passes, see ``_options``) and ignores the ones it has no use for;
# a fourth loader is one more entry here (and, if ``auto`` should pick it, a rule in
# ``_device_or``).
def _build_device(data, *, train, class_balanced, device, dtype, channels_last, static, common,
                  **_):
    if class_balanced and train:
        raise ConfigError("--class-balanced is not available with --loader device (its "
                          "epoch order is drawn on the device): use --loader dali or torch")
    from .device import DeviceLoader
    return DeviceLoader(data, **common, device=device, dtype=dtype, channels_last=channels_last,
                        static=static)


def _build_dali(data, *, train, class_balanced, device, dtype, channels_last, static, common,
                workers, scan, **_):
    from .dali import DaliLoader
    dev = torch.device(device) if device is not None else None
    return DaliLoader(data, **common, class_balanced=class_balanced and train,
                      device=dev if dev is not None and dev.type == "cuda" else None,
                      threads=max(1, workers), dtype=dtype, channels_last=channels_last,
                      static=static, scan=scan)


def _build_torch(data, *, train, class_balanced, device, channels_last, common, workers, **_):
    build = build_cached_loader if isinstance(data, PackedSplit) else build_loader
    return build(data, **common, class_balanced=class_balanced and train, workers=workers,
                 device=device, channels_last=channels_last)


LOADERS: dict[str, Callable[..., BatchLoader]] = {
    "device": _build_device, "dali": _build_dali, "torch": _build_torch}
BACKENDS = ("auto", *LOADERS)  # the names --loader takes


def resolve_backend(backend: str = "auto", log: Callable[[str], None] = print) -> str:
    """The loader a requested backend names: itself, or for ``auto`` DALI where it imports,
    else the plain loader (module docstring)."""
    from .dali import dali_available
    if backend != "auto" and backend not in LOADERS:
        names = ", ".join(("auto", *LOADERS))
        raise ConfigError(f"--loader must be one of {names}, not {backend!r}")
    if backend in LOADERS and backend != "dali":
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
    (:class:`~pgnm_fast.pipelines.samplers.ClassBalancedSampler`; not with the device loader).
    """
    check_on_bad(on_bad_image)
    if not isinstance(data, Split):
        source = open_source(data, skip_bad=on_bad_image == "skip")
        data = source.split(split or ("train" if train else "val"))
        report_bad(source.problems, on_bad_image, None, log, what="entry")
    rank, world_size = _torchrun_rank(rank, world_size)
    packed = isinstance(data, PackedSplit)
    kind = _colour_rule(_device_or(backend, data, packed, train, device, rank, world_size, log),
                        backend, data, channels, log)
    scan = None
    if not packed:
        data, scan = _checked(data, kind, rank, world_size, recheck, on_bad_image, bad_list, log)
    common = dict(train=train, batch_size=batch_size, crop_size=crop_size,
                  resize_size=resize_size, channels=channels, seed=seed, rank=rank,
                  world_size=world_size, mean=mean, std=std)
    return LOADERS[kind](data, common=common, train=train, class_balanced=class_balanced,
                         device=device, dtype=dtype, channels_last=channels_last, static=static,
                         workers=workers, scan=scan)


def _colour_rule(kind: str, backend: str, data, channels: int, log) -> str:
    """The plain loader for a 3-channel run over colour images it keeps in colour (a MedMNIST
    RGB file, :func:`~.loader.keeps_colour`): ``auto`` picks it, saying so once; another
    ``--loader`` stops with one line."""
    if kind == "torch" or channels != 3 or not keeps_colour(data):
        return kind
    if backend != "auto":
        raise ConfigError(f"--loader {backend} reads {data.name} images grey only; a 3-channel "
                          f"run on RGB MedMNIST images needs --loader torch (or auto)")
    if ("colour", data.name) not in _told:
        _told.add(("colour", data.name))
        log(f"the {data.name} split's RGB images in 3 channels: data loading uses the plain "
            f"PyTorch loader")
    return "torch"


def _checked(data: Split, kind: str, rank: int, world_size: int, recheck: bool,
             on_bad_image: str, bad_list, log) -> tuple[Split, check.ScanResult]:
    """The image files of ``data`` checked before the first batch (:mod:`.startup`), the bad
    ones handled by the ``--on-bad-image`` rule (:func:`~.badfiles.drop_bad`)."""
    t0 = time.perf_counter()
    scan = startup.checked(data.files, data.root, rank=rank, world_size=world_size,
                           recheck=recheck, log=log)
    if time.perf_counter() - t0 > 5:
        log(f"checked {len(data.files)} image files in {time.perf_counter() - t0:.0f} s (a "
            f"cache made by `pgnm-fast pack` needs no check)")
    if kind == "dali":
        _note_converted(data, scan, log)
    return drop_bad(data, scan, on_bad_image, bad_list, log)


def _note_converted(data: Split, scan: check.ScanResult, log) -> None:
    """Say once per process how many files of ``data`` DALI cannot decode itself, with the
    list of them in the data's start-up cache folder (:func:`~.badfiles.list_path`)."""
    converted = np.flatnonzero(scan.kind == check.CONVERT)
    if not len(converted):
        return
    path = badfiles.list_path(data.root, data.name, "not-grey8")
    line = (f"{len(converted)} of {len(data.files)} {data.name} files are not 8-bit grey PNGs: "
            f"PIL decodes them for DALI on the fly (`pgnm-fast pack` decodes them once)")
    full = f"{line}; listed in {path}"
    if badfiles.said(full):
        return  # said, and listed, already
    listed = badfiles.write_list(path, [(data.files[i], "not an 8-bit grey PNG") for i in converted])
    badfiles.say_once(full if listed else line, log)
