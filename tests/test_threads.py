"""CPU runs: the intra-op thread count from the cores other processes leave; --threads wins."""
import os

import pytest
import torch

from pgnm_fast import threads as thread_policy
from pgnm_fast.config import make_config
from pgnm_fast.errors import ConfigError
from pgnm_fast.threads import busy_elsewhere, default_threads, intra_op_threads

CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def load(monkeypatch):
    """``load(x, cpus)``: other processes keep x of the machine's ``cpus`` CPUs busy now."""
    def set_load(x, cpus=CORES):
        default_threads.cache_clear()
        monkeypatch.setattr(thread_policy, "busy_elsewhere", lambda: x / cpus)
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    yield set_load
    default_threads.cache_clear()


@pytest.mark.parametrize("x", [0.0, 0.9, 1.0, 1.7, 64.0])
def test_cores_less_the_load_of_other_processes(x, load, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    load(x)
    threads, why = intra_op_threads(make_config("heated", "tiny", workers=2), torch.device("cpu"))
    assert threads == max(1, CORES - int(min(x, CORES)))
    assert f"{min(x, CORES):.1f} of them busy" in why and "--threads" in why


def test_the_load_of_a_larger_machine_counts_in_proportion(load):
    load(32.0, cpus=64)  # half of a 64-CPU host busy: half of an 8-core share
    assert default_threads(8, 1)[0] == 4
    load(0.9, cpus=64)
    assert default_threads(8, 1)[0] == 8


def test_decided_once_per_process(load, monkeypatch):
    """compare's later stages do not count the load its earlier stages made."""
    load(0.0)
    first = default_threads(2, 1)
    monkeypatch.setattr(thread_policy, "busy_elsewhere", lambda: 1.0)
    assert default_threads(2, 1) == first == (2, "2 cores, 0.0 of them busy with other "
                                                 "processes; --threads sets it")


def test_without_proc_the_load_average_decides(monkeypatch):
    default_threads.cache_clear()
    monkeypatch.setattr(thread_policy, "busy_elsewhere", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (32.0, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    try:
        assert default_threads(8, 1)[0] == 4
    finally:
        default_threads.cache_clear()


def _proc(root, total_ticks, idle, own):
    """A fake /proc: the machine's CPU line and this process's stat line (utime, stime)."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    busy = total_ticks - idle
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 ...\n")
    fields = ["S"] + ["0"] * 10 + [str(own), "0"] + ["0"] * 30
    (root / "self" / "stat").write_text("4242 (pgnm fast) " + " ".join(fields) + "\n")


def test_busy_elsewhere_counts_other_processes_only(tmp_path, monkeypatch):
    """Over the window the machine used 140 of 200 ticks, 100 of them this process's own:
    others took 40 of 200."""
    _proc(tmp_path, 1000, 400, 50)
    monkeypatch.setattr(thread_policy.time, "sleep", lambda s: _proc(tmp_path, 1200, 460, 150))
    assert busy_elsewhere(0.5, proc=str(tmp_path)) == pytest.approx(0.2)
    _proc(tmp_path, 1000, 400, 50)  # only this process busy: nobody else
    monkeypatch.setattr(thread_policy.time, "sleep", lambda s: _proc(tmp_path, 1200, 500, 150))
    assert busy_elsewhere(0.5, proc=str(tmp_path)) == 0.0
    assert busy_elsewhere(0.5, proc=str(tmp_path / "none")) is None
    monkeypatch.undo()
    real = busy_elsewhere(0.05)  # the real /proc where there is one
    assert real is None or 0.0 <= real <= 1.0


def test_share_of_the_cores_under_torchrun(load, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    load(0.0)
    threads, _ = intra_op_threads(make_config("heated", "tiny", workers=0), torch.device("cpu"))
    assert threads == max(1, CORES // 2)


def test_threads_flag_wins_and_gpu_keeps_the_default(load):
    load(64.0)
    cfg = make_config("heated", "tiny", workers=2, threads=3)
    assert intra_op_threads(cfg, torch.device("cpu")) == (3, "--threads")
    assert intra_op_threads(cfg, torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="--threads"):
        make_config("heated", "tiny", threads=-1)


@pytest.mark.slow
def test_the_count_chosen_is_recorded_and_kept_when_the_run_resumes(small_data, tmp_path, load):
    """A resumed run sums in the order the interrupted one did: it keeps the recorded count
    whatever the load says now (exact resume)."""
    from click.testing import CliRunner

    from pgnm_fast.cli import main
    from pgnm_fast.run_state import load_run_state
    small = ["-b", "16", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size",
             "32", "--grid", "8", "-j", "0", "--impl", "reference", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        load(0.0)
        out = tmp_path / "run"
        r = CliRunner().invoke(main, ["train", "--data", str(small_data), "--out", str(out),
                                      "--epochs", "1", *small], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert load_run_state(out / "last.pt").config["threads"] == CORES
        load(64.0)  # a busy machine now: the default alone would give 1 thread
        r = CliRunner().invoke(main, ["train", "--resume", str(out / "last.pt"), "--epochs", "2"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert f"{CORES} intra-op thread" in r.output and "as the run it resumes" in r.output
        assert torch.get_num_threads() == CORES
        assert load_run_state(out / "last.pt").config["threads"] == CORES
    finally:
        torch.set_num_threads(before)
