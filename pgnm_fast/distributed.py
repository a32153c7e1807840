"""torchrun / DistributedDataParallel set-up: no home-made scheme. The one reader of torchrun's
environment (:func:`torchrun_env`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist


class TorchrunEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env() -> TorchrunEnv:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (one process without it)."""
    def read(name: str, default: str) -> int:
        return int(os.environ.get(name, default))
    return TorchrunEnv(read("RANK", "0"), read("WORLD_SIZE", "1"), read("LOCAL_RANK", "0"),
                       max(1, read("LOCAL_WORLD_SIZE", "1")))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPUs."""
    rank, world_size, local_rank, _ = torchrun_env()
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from .errors import ConfigError
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (asynchronous on the device: no host sync)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.div_(dist.get_world_size())


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every process. DDP broadcasts them
    before each forward, so the last step leaves each rank its own; validation and checkpoint
    averaging then see the weights and statistics that rank 0 saves."""
    if info.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_to_main(arrays: tuple, info: DistInfo):
    """Each process's numpy ``arrays``, concatenated in rank order on rank 0; None on the
    others. A process with nothing to give passes None."""
    if not info.distributed:
        return arrays
    parts = [None] * info.world_size if info.is_main else None
    dist.gather_object(arrays, parts, dst=0)
    if not info.is_main:
        return None
    parts = [p for p in parts if p is not None]
    return tuple(np.concatenate(column) for column in zip(*parts))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed:
        shutdown()


def shutdown() -> None:
    """Take down the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
