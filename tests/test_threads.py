"""CPU runs: the intra-op thread count from the cores the data loading leaves; --threads wins."""
import os

import pytest
import torch

from pgnm_fast.config import make_config
from pgnm_fast.errors import ConfigError
from pgnm_fast.stages import intra_op_threads

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers", [0, 1, 2, 64])
def test_cores_left_after_the_loading_workers(workers, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = make_config("heated", "tiny", workers=workers)
    assert intra_op_threads(cfg, torch.device("cpu")) == max(1, CORES - workers)


def test_share_of_the_cores_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = make_config("heated", "tiny", workers=0)
    assert intra_op_threads(cfg, torch.device("cpu")) == max(1, CORES // 2)


def test_threads_flag_wins_and_gpu_keeps_the_default(monkeypatch):
    cfg = make_config("heated", "tiny", workers=2, threads=3)
    assert intra_op_threads(cfg, torch.device("cpu")) == 3
    assert intra_op_threads(cfg, torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="--threads"):
        make_config("heated", "tiny", threads=-1)
