"""``--loader device``: a packed cache resident in device memory, augmented where it lies.

:class:`DeviceLoader` copies a packed split's pixels once into one flat uint8 tensor on
``device`` (grey: an RGB cache becomes grey by PIL's ITU-R 601-2 luma, as the other loaders
read it), with each image's native height and width from the cache's records. Every batch is
then cut, resized, flipped and normalised there by :func:`~pgnm_fast.pipelines.augment.resized_crop`
(the Triton kernel on CUDA; on the CPU torch's antialiased uint8 resize, one image per task
over a thread pool): on a GPU no image crosses PCIe or meets a CPU after the first copy.

Plans: the crop boxes and flips of an epoch are drawn on the host when the epoch starts, by
DALI's vectorised rules (:func:`~pgnm_fast.pipelines.transforms.random_resized_crop_params`:
torchvision's RandomResizedCrop, area uniform in scale, log-ratio uniform in ratio, 10 tries,
centre-crop fallback; flip with p = 0.5) from ``numpy.random.default_rng([seed, rank, epoch])``,
and go to the device in one copy. An epoch is thus a pure function of ``(seed, rank, epoch)``
(the same crops and flips as the DALI loader's), and a step reads its slice of the plan with no
host synchronisation. Eval: torchvision's shorter-side resize and centre crop
(:func:`~pgnm_fast.pipelines.transforms.eval_params`), zero padding for a small image.

Pixels: PIL's bilinear resampling (antialiased when shrinking). On CUDA (and with
``impl="torch"``) done as PIL does it, a horizontal fixed-point pass into an 8-bit
intermediate, then a vertical one; this equals the plain loader's Pillow exactly where Pillow
runs its passes in that order (every Pillow before 13; Pillow 13 runs the vertical pass first
for some shapes, and the two orders differ by at most 1 grey level, on a few percent of
pixels). On the CPU (``impl="interpolate"``, the default there) torch's own uint8 resize with
PIL's rules and 16-bit weights: within 1 grey level of PIL and of the exact path, a few
percent of pixels apart; deterministic, so a resumed run still replays its batches exactly.

Order: train uses the plain loader's :class:`~pgnm_fast.pipelines.samplers.EpochSampler` when
the process holds the whole split (``resident="full"``, the default for one process); under
torchrun with ``resident="shard"`` (the default there) rank ``r`` holds only the images
``r, r + world_size, ...`` of the split and shuffles them by ``(seed, epoch)`` (padded by its
own first images to the longest shard's length, as ``DistributedSampler`` pads): every image is
seen once per epoch over all ranks, though not in the plain loader's global order. Eval: each
rank's :class:`~pgnm_fast.pipelines.samplers.EvalShardSampler` indices (those are its shard).

Output: ``(images, labels)``, images ``[N, C, S, S]`` in ``dtype`` (float32 or bf16),
``channels_last`` memory if asked, ``C`` 1 or 3 (copies of grey); labels int64. ``static=True``
writes every batch into the same two tensors (``loader.buffers``), which a captured CUDA graph
reads without a copy; the consumer must be done with a batch before asking for the next.

Inside the captured step (``--graphs`` on one GPU): the trainer calls :meth:`DeviceLoader.defer_fill`.
The epoch's plan then lives in static device tensors (``[batches, batch_size, ...]``, the new
epoch's plan copied into them when the epoch starts, outside the graph) with a device-side step
counter; :meth:`DeviceLoader.fill` picks the counter's batch by tensor indexing, augments it into
the static buffers, gathers its labels and advances the counter, with no host synchronisation.
The graphed step runs it before the step and captures it with the step, so one replay is the
augmentation and the step, and the iterator only yields the buffers. The batches are the same,
bit for bit, as the eager ones. Without ``--graphs``, on the CPU or under torchrun every batch
is filled by the iterator.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pgnm_fast.errors import DataError

from .augment import check_impl, resized_crop, taps, value_table
from .samplers import EpochSampler, EvalShardSampler, ShardSampler
from .transforms import MEAN, STD, eval_params, grey_of, random_resized_crop_params

MARGIN_FRACTION, MARGIN_MIN = 0.2, 8 << 30  # device memory kept free for the model and step
RESIDENT = ("full", "shard")
_CHUNK = 256 << 20  # host-to-device copy size while loading


def grey_bytes(split) -> int:
    """Device bytes :class:`DeviceLoader` needs for ``split``'s pixels (grey)."""
    return int((split.heights * split.widths).sum())


def resident_bytes(split, *, train: bool, rank: int, world_size: int, resident: str) -> int:
    """Bytes this process keeps on the device for ``split`` (its shard or the whole split)."""
    if resident == "shard" or not train:
        keep = np.arange(rank, len(split), world_size)
        return int((split.heights[keep] * split.widths[keep]).sum())
    return grey_bytes(split)


def fits(need: int, device) -> tuple[bool, str]:
    """Whether ``need`` bytes fit in ``device``'s free memory after the margin, and the sizes
    in words (``MARGIN_FRACTION`` of the device's memory, at least ``MARGIN_MIN``)."""
    free, total = torch.cuda.mem_get_info(device)
    margin = max(MARGIN_MIN, int(MARGIN_FRACTION * total))
    gib = 2 ** 30
    words = (f"cache {need / gib:.2f} GiB, {free / gib:.2f} GiB free on {device} less a "
             f"{margin / gib:.1f} GiB margin")
    return need <= free - margin, words


class DeviceLoader:
    """An iterable of ``(images, labels)`` batches from a packed split held on ``device``
    (module docstring). ``impl``: ``"auto"`` (Triton on CUDA, ``"interpolate"`` on the CPU),
    ``"triton"``, ``"torch"`` or ``"interpolate"`` (:func:`~pgnm_fast.pipelines.augment.resized_crop`);
    ``threads``: the CPU resize's thread pool (default: torch's intra-op thread count)."""

    def __init__(self, split, *, train: bool, batch_size: int, crop_size: int = 224,
                 resize_size: int = 256, channels: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device=None, dtype=torch.float32,
                 channels_last: bool = False, static: bool = False, resident: str | None = None,
                 mean: float = MEAN, std: float = STD, impl: str = "auto",
                 threads: int | None = None):
        if not hasattr(split, "cache"):
            raise DataError(f"--loader device reads a packed cache (pgnm-fast pack); the "
                            f"{split.name} split is image files")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        check_impl(impl)
        resident = resident or ("shard" if world_size > 1 else "full")
        if resident not in RESIDENT:
            raise ValueError(f"resident must be one of {RESIDENT}, not {resident!r}")
        self.split, self.train, self.batch_size = split, train, batch_size
        self.crop_size, self.resize_size, self.channels = crop_size, resize_size, channels
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype, self.channels_last, self.static, self.impl = dtype, channels_last, static, impl
        self.threads = threads
        self.resident = resident if train else "shard"
        n = len(split)
        if train and self.resident == "full":
            self.sampler = EpochSampler(range(n), num_replicas=world_size, rank=rank, seed=seed)
        elif train:
            self.sampler = ShardSampler(n, world_size, rank, seed)
        else:
            self.sampler = EvalShardSampler(n, world_size, rank)
        if train and len(self.sampler) < batch_size:
            raise DataError(f"the {split.name} split has {n} images, fewer than one batch of "
                            f"{batch_size} per process ({world_size} processes)")
        # the split indices this process holds, and where each split index sits among them
        self.held = np.arange(n) if self.resident == "full" else np.arange(rank, n, world_size)
        self._slot = np.full(n, -1, np.int64)
        self._slot[self.held] = np.arange(len(self.held))
        self.height = split.heights[self.held]
        self.width = split.widths[self.held]
        self.table = value_table(mean, std, dtype, self.device)
        if train:  # a crop is at most the image, resized to crop_size
            self.taps = taps(int(max(self.height.max(initial=1), self.width.max(initial=1))),
                             crop_size)
        else:  # the whole image resized to torchvision's shorter-side size
            rh, rw, _, _ = eval_params(self.height, self.width, crop_size, resize_size)
            scale = np.maximum(self.height / rh, self.width / rw).max(initial=1.0)
            self.taps = 2 * math.ceil(max(scale, 1.0)) + 1
        self._load()
        self.buffers = None
        self.prologue = None  # defer_fill(): the batch fill runs inside the step
        self._plan = self._step = None

    # -- residency
    def _load(self):
        """Copy the held images into one flat uint8 device tensor (grey), in chunks."""
        cache, records = self.split.cache, self.split.records[self.held]
        sizes = self.height * self.width
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.data = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=self.device)
        pin = self.device.type == "cuda"
        start = 0
        while start < len(records):
            stop, nbytes = start, 0
            while stop < len(records) and (nbytes == 0 or nbytes + sizes[stop] <= _CHUNK):
                nbytes += int(sizes[stop])
                stop += 1
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            view = host.numpy()
            off = cache.records["offset"][records[start:stop]]
            if cache.channels == 1 and (np.diff(off) == sizes[start:stop - 1]).all():
                view[:] = cache.data[off[0]:off[0] + nbytes]  # back to back in the file
            else:
                at = 0
                for r in records[start:stop]:
                    grey = grey_of(cache.image(int(r)))
                    view[at:at + grey.size] = grey.reshape(-1)
                    at += grey.size
            self.data[int(base[start]):int(base[start]) + nbytes].copy_(host)
            start = stop
        if pin:
            torch.cuda.synchronize(self.device)  # the pinned chunks are freed after this
        dev = self.device
        self.base = torch.from_numpy(base).to(dev)
        self.row = torch.from_numpy(self.width.astype(np.int64)).to(dev)
        self.shape = torch.from_numpy(np.stack([self.height, self.width], 1).astype(np.int64)).to(dev)
        self.labels = torch.from_numpy(np.asarray(self.split.labels)[self.held].astype(np.int64)).to(dev)

    @property
    def name(self) -> str:
        return f"the cache resident on {self.device}"

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    # -- the trainer's loader contract
    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    # -- planning
    def plan_epoch(self) -> dict:
        """The next epoch on the device: slot (position in the resident data) of each sample,
        crop box, virtual output size, offset and flip (advances the sampler one pass)."""
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        slot = self._slot[order]
        h, w, cs = self.height[slot], self.width[slot], self.crop_size
        if self.train:
            keep = len(order) // self.batch_size * self.batch_size
            slot, h, w = slot[:keep], h[:keep], w[:keep]
            rng = np.random.default_rng([self.seed, self.rank, self.sampler.epoch])
            top, left, ch, cw = random_resized_crop_params(h, w, rng)
            flip = rng.random(len(slot)) < 0.5
            box = np.stack([top, left, ch, cw], 1)
            out_hw = np.full((len(slot), 2), cs, np.int64)
            offset = np.zeros((len(slot), 2), np.int64)
        else:
            rh, rw, top, left = eval_params(h, w, cs, self.resize_size)
            box = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], 1)
            out_hw, offset = np.stack([rh, rw], 1), np.stack([top, left], 1)
            flip = np.zeros(len(slot), bool)
        arrays = dict(slot=slot, box=box, out_hw=out_hw, offset=offset, flip=flip)
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                for k, v in arrays.items()}

    # -- running
    def _out_tensors(self, n):
        if self.static and self.buffers is not None:
            return self.buffers
        images = torch.empty((n, self.channels, self.crop_size, self.crop_size), dtype=self.dtype,
                             device=self.device, memory_format=torch.channels_last
                             if self.channels_last else torch.contiguous_format)
        labels = torch.empty(n, dtype=torch.int64, device=self.device)
        if self.static:
            self.buffers = (images, labels)
        return images, labels

    def batch(self, plan: dict, start: int, n: int, out=None):
        """Augment samples ``start .. start + n`` of ``plan`` into ``out`` (or new tensors)."""
        images, labels = out if out is not None else self._out_tensors(self.batch_size)
        sl = slice(start, start + n)
        return self._augment({k: v[sl] for k, v in plan.items()}, images[:n], labels[:n])

    def _augment(self, rows: dict, images, labels):
        """The plan ``rows`` of one batch, augmented into ``images``, their labels into
        ``labels``; tensor ops only (no host synchronisation on CUDA)."""
        slot = rows["slot"]
        resized_crop(images, self.data, self.base.index_select(0, slot),
                     self.row.index_select(0, slot), rows["box"], rows["out_hw"],
                     rows["offset"], rows["flip"], self.table, self.taps, impl=self.impl,
                     threads=self.threads)
        torch.index_select(self.labels, 0, slot, out=labels)
        return images, labels

    def __iter__(self):
        plan = self.plan_epoch()
        total, B = len(plan["slot"]), self.batch_size
        if self.prologue is not None:
            yield from self._unfilled(plan)
            return
        for start in range(0, total, B):
            yield self.batch(plan, start, min(B, total - start))

    # -- the batch fill inside the captured step (--graphs)
    def defer_fill(self):
        """Move the fill of every train batch into the step: from the next epoch on, the
        iterator yields ``buffers`` unfilled (``len(self)`` times an epoch) and :meth:`fill`,
        also ``self.prologue``, fills them with the epoch's next batch; the graphed step runs
        it before the step and captures it with the step (:class:`pgnm_fast.graphs.GraphedStep`
        ``prologue``). Only for a static train loader (every batch full: train drops the last
        partial one). Returns :meth:`fill`."""
        if not (self.train and self.static):
            raise ValueError("only a static train loader can fill its batches inside the step")
        self.prologue = self.fill
        return self.fill

    def _unfilled(self, plan: dict):
        """Copy the epoch's plan into the static plan tensors (``[batches, batch_size, ...]``,
        allocated once: a captured graph reads them by address), reset the step counter,
        then yield the static buffers once per batch."""
        steps, B = len(plan["slot"]) // self.batch_size, self.batch_size
        rows = {k: v[:steps * B].view(steps, B, *v.shape[1:]) for k, v in plan.items()}
        if self._plan is None or len(self._plan["slot"]) != steps:
            self._plan = {k: v.clone() for k, v in rows.items()}
            self._step = torch.zeros(1, dtype=torch.int64, device=self.device)
        else:
            for k, v in rows.items():
                self._plan[k].copy_(v)
            self._step.zero_()
        batch = self._out_tensors(B)
        for _ in range(steps):
            yield batch

    def fill(self):
        """Fill ``buffers`` with the batch the device-side step counter points at, then advance
        the counter in place: the batch's plan rows are picked by ``index_select`` with the
        counter (no Python int from device data, no ``.item()``, fixed shapes), so the fill
        is capturable in a CUDA graph and each replay fills the next batch. A counter past the
        epoch's last batch wraps to its first."""
        at = torch.remainder(self._step, len(self._plan["slot"]))
        rows = {k: v.index_select(0, at)[0] for k, v in self._plan.items()}
        self._augment(rows, *self.buffers)
        self._step.add_(1)
