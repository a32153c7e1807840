"""DALI pipelines: the transforms of docs/method.md §1 from PNG files or a packed cache, GPU or
CPU-only.

One graph for both variants, only device placement differs (``device`` a CUDA device: decode
with the ``mixed`` decoder where DALI can, everything after it on the GPU; ``device=None`` or a
CPU device: every operator on the CPU, ``device_id=None``):

- train: decode and slice(top, left, h, w) (``decoders.image_slice``) -> resize(crop x crop,
  linear, antialias) -> crop_mirror_normalize(mirror, mean, std); from a packed cache the crop
  is cut out of the memory map in numpy and fed instead of an encoded image;
- eval: decode -> resize(torchvision's shorter-side size) -> slice(centre crop, zero padding
  for an image smaller than the crop) -> crop_mirror_normalize.

Every random draw is made in Python (numpy), from ``(seed, rank, epoch)``, by the rules of
:class:`pgnm_fast.pipelines.transforms.RandomResizedCrop` (area uniform in ``scale``, log-ratio
uniform in ``ratio``, 10 tries, torchvision's centre-crop fallback; flip with p = 0.5), and fed
to DALI with the data through one external source. DALI only computes, so an epoch is a pure
function of ``(seed, rank, epoch)``: a resumed run replays the interrupted epoch's batches bit
for bit on the same device kind and DALI version (GPU and CPU results differ by float rounding).
The sample order is the plain loader's (:class:`~pgnm_fast.pipelines.samplers.EpochSampler` for
train, :class:`~pgnm_fast.pipelines.samplers.EvalShardSampler` for eval), so both loaders visit
the same images in the same order for a given seed.

Interpolation: the crop is cut out first and then resized, as torchvision does for PIL images.
DALI's linear resize equals PIL's bilinear up to rounding (at most 1 grey level) when enlarging
or keeping the size; when shrinking both low-pass filter, with slightly different filter
shapes (a few grey levels on pixel noise, well under one on average). Decoding is bit-exact.

Batches: train batches have a fixed shape and the last partial batch is dropped; eval pads its
last batch inside DALI (repeating the last image) and drops the padding before yielding, so
every image is seen exactly once. Output: ``(images, labels)``, images ``[N, C, H, W]`` float32
or bf16 normalised (``channels_last`` gives NHWC memory), ``C`` 1 or 3 (copies of the grey
channel), labels int64; on ``device`` (the CPU variant yields CPU tensors). ``static=True``
writes every batch into the same two tensors (``loader.buffers``): the fixed addresses a
captured CUDA graph replays on; the consumer must be done with a batch (or have queued its work
on the current stream) when it asks for the next one, and must not keep the tensors.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pgnm_fast.errors import DataError

from . import check
from .badfiles import drop_bad
from .packed import PackedSplit
from .samplers import EvalShardSampler, train_sampler
from .sources import Split
from .transforms import MEAN, STD, eval_params, load_grey, random_resized_crop_params


@functools.lru_cache(maxsize=1)
def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plug-in import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing CUDA libraries, ...)
        return False
    return True


# ----------------------------------------------------------------------------- samples
class _PngSamples:
    """Encoded PNG bytes per file; files that are not 8-bit grey PNGs are decoded by PIL
    (``load_grey``) and re-encoded as 8-bit grey PNGs, so DALI applies the same rules."""

    encoded = True

    def __init__(self, files, scan: check.ScanResult, threads: int):
        self.files, self.kind = files, scan.kind
        self.height, self.width = scan.height, scan.width
        self.threads, self._pool = threads, (None, None)

    def _read(self, i):
        if self.kind[i] == check.GREY8:
            return np.fromfile(self.files[i], dtype=np.uint8)
        buf = io.BytesIO()
        load_grey(self.files[i]).save(buf, format="PNG", compress_level=0)
        return np.frombuffer(buf.getvalue(), dtype=np.uint8)

    def read(self, indices):
        pid, pool = self._pool
        if pid != os.getpid():
            pool = ThreadPoolExecutor(self.threads)
            self._pool = (os.getpid(), pool)
        return list(pool.map(self._read, indices))

    def name(self, i):
        return self.files[i]


class _CacheSamples:
    """Decoded pixels from a packed cache: views of the memory map, no decoding."""

    encoded = False

    def __init__(self, split):
        self.cache, self.files = split.cache, split.files
        rec = split.cache.records[split.records]
        self.height, self.width = rec["height"].astype(np.int64), rec["width"].astype(np.int64)
        self.offset, self.channels = rec["offset"].astype(np.int64), split.cache.channels
        self._flat = (None, None)

    def _images(self, indices):
        pid, flat = self._flat
        if pid != os.getpid():  # a plain ndarray view of the map: cheap slicing
            flat = np.asarray(self.cache.data)
            self._flat = (os.getpid(), flat)
        c = self.channels
        for off, h, w in zip(self.offset[indices].tolist(), self.height[indices].tolist(),
                             self.width[indices].tolist()):
            yield flat[off:off + h * w * c].reshape(h, w, c)

    def read(self, indices, anchor=None, shape=None):
        """Whole images (views), or with ``anchor``/``shape`` copies of the crops alone."""
        if anchor is None:
            return list(self._images(indices))
        return [np.ascontiguousarray(img[t:t + h, x:x + w]) for img, (t, x), (h, w)
                in zip(self._images(indices), anchor.tolist(), shape.tolist())]

    def name(self, i):
        return self.files[i]


@dataclass
class _Batch:
    indices: np.ndarray  # into the split, padded to the batch size
    valid: int           # leading entries that are real (eval pads the last batch)
    anchor: np.ndarray   # (B, 2) int32 top, left
    shape: np.ndarray    # (B, 2) int32 height, width of the slice
    mirror: np.ndarray   # (B,) int32
    size: np.ndarray     # (B, 2) float32 resize target (eval)


class _Feed:
    """The pipeline's external-source callback: the epoch's batches, one per call."""

    def __init__(self, samples, train: bool):
        self.samples, self.train = samples, train
        self.batches, self.k = [], 0

    def start(self, batches):
        self.batches, self.k = batches, 0

    def stop(self):
        self.k = len(self.batches)

    def __call__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        b = self.batches[self.k]
        self.k += 1
        if not self.train:
            return self.samples.read(b.indices), b.size, b.anchor, b.shape
        if self.samples.encoded:
            return self.samples.read(b.indices), b.anchor, b.shape, b.mirror
        return self.samples.read(b.indices, b.anchor, b.shape), b.mirror  # cache: numpy crops


def _build_pipeline(feed, *, train, encoded, colour, crop_size, batch_size, threads,
                    device_id, mean, std, channels_last, prefetch):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                  prefetch_queue_depth=prefetch)
    def graph():
        i32, layout = types.INT32, "" if encoded else "HWC"
        if train and not encoded:  # crops cut out by the feed
            data, mirror = fn.external_source(source=feed, num_outputs=2, batch=True,
                                              dtype=[types.UINT8, i32], layout=[layout, ""])
        elif train:
            data, anchor, shape, mirror = fn.external_source(
                source=feed, num_outputs=4, batch=True, dtype=[types.UINT8, i32, i32, i32])
        else:
            data, size, anchor, shape = fn.external_source(
                source=feed, num_outputs=4, batch=True, layout=[layout, "", "", ""],
                dtype=[types.UINT8, types.FLOAT, i32, i32])
        decoder = dict(device="mixed" if gpu else "cpu", output_type=types.GRAY)
        if encoded and train:  # decode and crop in one operator
            images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", **decoder)
        elif encoded:
            images = fn.decoders.image(data, **decoder)
        else:
            images = data.gpu() if gpu else data
            if colour:
                images = fn.color_space_conversion(images, image_type=types.RGB,
                                                   output_type=types.GRAY)
        if train:
            images = fn.resize(images, size=[crop_size, crop_size], antialias=True)
        else:
            images = fn.resize(images, size=size, antialias=True)
            images = fn.slice(images, anchor, shape, axis_names="HW",
                              out_of_bounds_policy="pad", fill_values=0)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
            mean=[mean * 255.0], std=[std * 255.0], mirror=mirror if train else 0)

    pipe = graph()
    pipe.build()
    return pipe


class DaliLoader:
    """An iterable of ``(images, labels)`` batches through DALI (module docstring).

    ``split``: a :class:`~pgnm_fast.pipelines.sources.Split` of image files or a
    :class:`~pgnm_fast.pipelines.pack.PackedSplit`. ``device``: a CUDA device for the GPU
    variant, None or ``"cpu"`` for the CPU-only one. ``threads``: CPU threads for DALI.
    ``scan``: the split's :func:`~pgnm_fast.pipelines.check.scan` result (made here if absent);
    a bad file raises a DataError naming it before the first batch (use
    :func:`pgnm_fast.pipelines.make_loader` for ``on_bad_image="skip"``).
    """

    def __init__(self, split: Split, *, train: bool, batch_size: int, crop_size: int = 224,
                 resize_size: int = 256, channels: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str | None = None, threads: int = 2,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, static: bool = False,
                 prefetch: int = 2, scan: check.ScanResult | None = None, mean: float = MEAN,
                 std: float = STD, class_balanced: bool = False):
        if not dali_available():
            raise DataError("DALI is not installed (pip install nvidia-dali-cuda120); use the "
                            "plain PyTorch loader (--loader torch)")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.split, self.train, self.batch_size = split, train, batch_size
        self.crop_size, self.resize_size, self.channels = crop_size, resize_size, channels
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype, self.channels_last, self.static = dtype, channels_last, static
        self.mean, self.std, self.prefetch = mean, std, prefetch
        cpus = len(os.sched_getaffinity(0))
        self.threads = max(1, min(threads, cpus))
        if isinstance(split, PackedSplit):
            self.samples = _CacheSamples(split)
            self.colour = split.cache.channels == 3
        else:
            scan = scan if scan is not None else check.scan(split.files)
            split, scan = drop_bad(split, scan, "error")  # make_loader applies --on-bad-image
            self.samples = _PngSamples(split.files, scan, min(8, 2 * cpus))
            self.colour = False
        n = len(split)
        if train:
            self.sampler = train_sampler(split.labels, world_size, rank, seed, class_balanced)
            if len(self.sampler) < batch_size:
                raise DataError(f"the {split.name} split has {n} images, fewer than one batch of "
                                f"{batch_size} per process ({world_size} processes)")
        else:
            self.sampler = EvalShardSampler(n, world_size, rank)
        self._pipe, self._feed, self._dirty, self.buffers = None, None, False, None

    # -- the trainer's loader contract
    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def name(self) -> str:
        return f"DALI ({'GPU' if self.device.type == 'cuda' else 'CPU'})"

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    # -- planning (pure numpy: a function of seed, rank and epoch)
    def plan_epoch(self) -> list[_Batch]:
        """The next epoch's batches (advances the sampler as one pass of the plain loader)."""
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        B, cs = self.batch_size, self.crop_size
        if self.train:
            order = order[:len(order) // B * B]
            rng = np.random.default_rng([self.seed, self.rank, self.sampler.epoch])
            top, left, h, w = random_resized_crop_params(
                self.samples.height[order], self.samples.width[order], rng)
            mirror = rng.random(len(order)) < 0.5
            size = np.full((len(order), 2), cs, np.float32)
            valid = [B] * (len(order) // B)
        else:
            valid = [min(B, len(order) - s) for s in range(0, len(order), B)]
            pad = -len(order) % B
            order = np.concatenate([order, np.repeat(order[-1:], pad)])
            rh, rw, top, left = eval_params(self.samples.height[order],
                                            self.samples.width[order], cs, self.resize_size)
            h = w = np.full(len(order), cs, np.int64)
            mirror = np.zeros(len(order), bool)
            size = np.stack([rh, rw], 1).astype(np.float32)
        anchor = np.stack([top, left], 1).astype(np.int32)
        shape = np.stack([h, w], 1).astype(np.int32)
        return [_Batch(order[s:s + B], v, anchor[s:s + B], shape[s:s + B],
                       mirror[s:s + B].astype(np.int32), size[s:s + B])
                for v, s in zip(valid, range(0, len(order), B))]

    # -- running
    def _pipeline(self):
        if self._pipe is None:
            device_id = None
            if self.device.type == "cuda":
                device_id = self.device.index if self.device.index is not None \
                    else torch.cuda.current_device()
            self._feed = _Feed(self.samples, self.train)
            self._pipe = _build_pipeline(
                self._feed, train=self.train, encoded=self.samples.encoded, colour=self.colour,
                crop_size=self.crop_size, batch_size=self.batch_size, threads=self.threads,
                device_id=device_id, mean=self.mean, std=self.std,
                channels_last=self.channels_last, prefetch=self.prefetch)
        return self._pipe

    def _drain(self):
        """End the current epoch: drop the batches DALI prefetched, reset the pipeline."""
        if self._pipe is not None:
            self._feed.stop()
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                pass
            self._pipe.reset()
        self._dirty = False

    def _out_tensors(self):
        B, C, S = self.batch_size, self.channels, self.crop_size
        if self.static and self.buffers is not None:
            return self.buffers
        images = torch.empty((B, C, S, S), dtype=self.dtype, device=self.device,
                             memory_format=torch.channels_last if self.channels_last
                             else torch.contiguous_format)
        labels = torch.empty(B, dtype=torch.int64, device=self.device)
        if self.static:
            self.buffers = (images, labels)
        return images, labels

    def _copy_out(self, tensor_list, batch: _Batch):
        """The batch as torch tensors. DALI's output is a DLPack view (ready: ``run``
        synchronises with the host). When it already has the requested form and no static
        buffers are asked for, it is yielded as is: DALI's dynamic executor gives every
        iteration its own output buffer and keeps it while the view is alive. Otherwise one
        copy on the current stream converts dtype, layout and channel count."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" \
                else contextlib.nullcontext():
            out = torch.from_dlpack(tensor_list.as_tensor())
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)  # (B, H, W, 1) -> (B, 1, H, W) view
        labels = torch.from_numpy(self.split.labels[batch.indices])
        if not self.static and self.channels == 1 and self.dtype == torch.float32 \
                and getattr(self._pipe, "exec_dynamic", False):
            images, labels = out, labels.to(self.device, non_blocking=True)
        else:
            images, buf = self._out_tensors()
            images.copy_(out.expand(images.shape))
            labels = buf.copy_(labels, non_blocking=True)
        n = batch.valid
        return (images, labels) if n == self.batch_size else (images[:n], labels[:n])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._dirty:  # an earlier pass was abandoned: flush what it prefetched
            self._drain()
        batches = self.plan_epoch()
        pipe = self._pipeline()
        self._feed.start(batches)
        self._dirty = True
        return self._run(pipe, batches)

    def _run(self, pipe, batches):
        try:
            for b, batch in enumerate(batches):
                try:
                    out = pipe.run()
                except StopIteration:
                    raise RuntimeError("DALI pipeline ended early") from None
                except RuntimeError as e:
                    self._pipe, self._dirty = None, False  # DALI drops a pipeline that failed
                    raise self._explain(e, batches[b:b + 1 + self.prefetch]) from None
                yield self._copy_out(out[0], batch)
        finally:
            if self._dirty:
                self._drain()

    def _explain(self, error, batches) -> Exception:
        """A DALI failure as a DataError naming the file, if PIL cannot read it either."""
        for batch in batches:
            for i in batch.indices[:batch.valid]:
                name = self.samples.name(i)
                try:
                    load_grey(name) if self.samples.encoded else None
                except DataError as e:
                    return e
        first = str(error).strip().splitlines()
        return DataError(f"DALI failed on a batch of the {self.split.name} split "
                         f"({first[0] if first else type(error).__name__})")

    def __del__(self):
        pool = getattr(getattr(self, "samples", None), "_pool", (None, None))[1]
        if pool is not None:
            pool.shutdown(wait=False)
