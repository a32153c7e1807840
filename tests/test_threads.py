"""CPU runs: the intra-op thread count from the cores other processes leave; --threads wins."""
import os

import pytest
import torch

from pgnm_fast.config import make_config
from pgnm_fast.errors import ConfigError
from pgnm_fast.stages import intra_op_threads

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("load", [0.0, 0.9, 1.0, 1.7, 64.0])
def test_cores_less_the_load_of_other_processes(load, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    threads, why = intra_op_threads(make_config("heated", "tiny", workers=2), torch.device("cpu"))
    assert threads == max(1, CORES - int(load))
    assert f"load average {load:.1f}" in why and "--threads" in why


def test_share_of_the_cores_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # 1 per local process
    threads, _ = intra_op_threads(make_config("heated", "tiny", workers=0), torch.device("cpu"))
    assert threads == max(1, CORES // 2 - 1)


def test_threads_flag_wins_and_gpu_keeps_the_default(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    cfg = make_config("heated", "tiny", workers=2, threads=3)
    assert intra_op_threads(cfg, torch.device("cpu")) == (3, "--threads")
    assert intra_op_threads(cfg, torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="--threads"):
        make_config("heated", "tiny", threads=-1)
