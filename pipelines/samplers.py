"""The samplers of every loader: the order of an epoch, a function of ``(seed, rank, epoch)``.

- Train: :class:`EpochSampler` (a ``DistributedSampler`` with ``num_replicas=world_size``, also
  for one process) shuffles by ``(seed, epoch)``. Call ``set_epoch(epoch)`` at the start of each
  epoch (resuming at epoch e then replays epoch e's order); if it is not called, each new pass
  moves to the next epoch by itself, so no two epochs repeat an order. Across ranks it pads as
  ``DistributedSampler`` does: the permutation is extended by its own first
  ``ceil(N / world_size) * world_size - N`` indices. :class:`ClassBalancedSampler`
  (``--class-balanced``) draws with weight 1 / class count instead. :class:`ShardSampler`: the
  order of a rank that holds only its fixed shard (the device loader under torchrun).
- Eval: :class:`EvalShardSampler` gives rank r the indices ``r, r + world_size, ...``: each
  image exactly once over all ranks, no padding.

Augmentation seeds: a keyed train sampler yields ``(index, seed)`` pairs, the seed drawn by
:func:`sample_seeds` from ``(seed, rank, epoch, index)`` alone, so a batch of the plain loader
is the same whatever the number of workers and in a run resumed at any epoch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


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



class ShardSampler(Sampler):
    """Train order of a rank that holds the fixed shard ``rank, rank + world_size, ...``: its
    indices shuffled by ``(seed, epoch)`` and padded by their own first ones to
    ``ceil(n / world_size)``. One process: the same order as :class:`EpochSampler`."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.seed = n, num_replicas, rank, seed
        self.num_samples = math.ceil(n / num_replicas)
        self.epoch, self._passes, self._epoch_set = 0, 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        if self._passes and not self._epoch_set:  # as EpochSampler: the next epoch by itself
            self.epoch += 1
        self._passes, self._epoch_set = self._passes + 1, False
        shard = torch.arange(self.rank, self.n, self.num_replicas)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = shard[torch.randperm(len(shard), generator=g)].tolist()
        order += (order * math.ceil(self.num_samples / max(len(order), 1)))[
            :self.num_samples - len(order)]
        return iter(order)
