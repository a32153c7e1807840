"""CPU runs: how many intra-op threads torch uses.

Measured on a 2-core machine with the tiny quick start (DALI's CPU loader, 2 workers): idle, 2
threads ran the heated stage in 116 s against 186 s with 1 (the loader needs little of the
cores); busy with other jobs (load 8-16), 2 threads took 365-1,083 s against 126-148 s with 1
(torch's threads wait for cores the other jobs hold). So the default is this process's share of
the cores less those other processes keep busy now, decided once per process. The count chosen
is recorded with the run (``threads`` in its config) and kept when the run resumes: sums run in
another order on another count of threads, so a resumed run must keep it to end bit-identical to
an uninterrupted one.
"""
from __future__ import annotations

import functools
import os
import time

import torch

from .config import TrainConfig
from .distributed import torchrun_env


def intra_op_threads(cfg: TrainConfig, device: torch.device) -> tuple[int, str] | None:
    """CPU runs: ``(threads, why)``: ``--threads`` (or the count a resumed run recorded), else
    :func:`default_threads`. None on a GPU (torch's default stays)."""
    if device.type != "cpu":
        return None
    if cfg.threads:
        return cfg.threads, "--threads"
    return default_threads(len(os.sched_getaffinity(0)), torchrun_env().local_world_size)


def set_threads(cfg: TrainConfig, device: torch.device,
                resumed: TrainConfig | None = None) -> tuple[TrainConfig, str | None]:
    """Set torch's intra-op thread count for a CPU run; returns ``cfg`` recording it and the
    line that says why (``cfg`` and None on a GPU). ``resumed``: the config of the run resumed."""
    chosen = intra_op_threads(cfg, device)
    if chosen is None:
        return cfg, None
    threads, why = chosen
    torch.set_num_threads(threads)
    if resumed is not None and threads == resumed.threads:
        why = "as the run it resumes; --threads sets it"
    return (cfg.replace(threads=threads),
            f"{threads} intra-op thread{'s' if threads > 1 else ''} ({why})")


@functools.cache
def default_threads(cores: int, local: int) -> tuple[int, str]:
    """This process's share of ``cores`` (``local`` processes on the machine) less the cores
    other processes keep busy in it, truncated; at least 1. Busy: the share of the machine's CPU
    time other processes take now (:func:`busy_elsewhere`; the 1-minute load average over the
    CPUs where ``/proc`` is missing; the load average alone would still count a job that just
    ended, such as the install before the quick start's first run). Decided once per process,
    so that the later stages of ``compare`` do not count the load of the earlier ones."""
    share = max(1, cores // local)
    fraction = busy_elsewhere()
    if fraction is None:
        fraction = os.getloadavg()[0] / max(1, os.cpu_count() or cores)
    busy = min(fraction, 1.0) * share
    return max(1, share - int(busy)), (f"{share} core{'s' if share > 1 else ''}, {busy:.1f} of "
                                       f"them busy with other processes; --threads sets it")


def busy_elsewhere(window: float = 0.5, proc: str = "/proc") -> float | None:
    """The fraction of the machine's CPU time that other processes used over the next
    ``window`` seconds (``/proc/stat`` less this process's own time); None without ``/proc``."""
    def snap():
        with open(f"{proc}/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
        with open(f"{proc}/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks), ticks[3] + ticks[4], int(own[11]) + int(own[12])  # idle + iowait
    try:
        total0, idle0, mine0 = snap()
        time.sleep(window)
        total1, idle1, mine1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return max(0.0, (elapsed - (idle1 - idle0) - (mine1 - mine0)) / elapsed)


def command_log(threads: int | None, device: str, echo):
    """CPU runs of eval / transfer: set the intra-op threads train would choose (``--threads``,
    else :func:`default_threads`); returns the command's log (``echo`` on a GPU). It says the
    count before the command's first line, so a command refused up front prints its one error
    line alone."""
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    chosen = intra_op_threads(TrainConfig(threads=threads or 0), torch.device("cpu" if cpu else "cuda"))
    if chosen is None:
        return echo
    torch.set_num_threads(chosen[0])
    pending = [f"{chosen[0]} intra-op thread{'s' if chosen[0] > 1 else ''} ({chosen[1]})"]

    def log(line):
        while pending:
            echo(pending.pop())
        echo(line)
    return log
