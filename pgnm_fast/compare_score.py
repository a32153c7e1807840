"""`pgnm-fast compare --score PGNM_RUN BASELINE_RUN [...]`: the report of `compare` (the same
statistics, table, ``compare.json`` and chart) over stages trained by hand, without training.

Each pair is a PGNM run (heated or fine-tuned) and a baseline run: run folders (their
``best.pt``, as `compare` scores, else ``last.pt``) or checkpoint files. Instead of pairs, a text
file may list them, two runs a line (``#`` starts a comment; relative paths are read from the
file's folder). Both models of every pair are scored on the test split of ``--data`` (default:
the data the first PGNM run trained on); a pair is a "seed" of the report, named by the seed its
PGNM run recorded (by its place in the list when two pairs share one).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .compare_report import record_seed
from .errors import ConfigError, DataError
from .evaluate import predict_checkpoint
from .run_state import load_run_state

LISTS = (".txt", ".csv", ".list")


def parse_pairs(items) -> list[tuple[Path, Path]]:
    """``[(pgnm, baseline), ...]`` from the runs given on the command line or a list file."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix in LISTS:
            for n, line in enumerate(p.read_text().splitlines(), 1):
                words = line.split("#")[0].replace(",", " ").split()
                if words and len(words) != 2:
                    raise ConfigError(f"{p}, line {n}: write two runs a line (PGNM_RUN "
                                      f"BASELINE_RUN), not {len(words)}")
                paths += [q if q.is_absolute() else p.parent / q for q in map(Path, words)]
        else:
            paths.append(p)
    if not paths or len(paths) % 2:
        raise ConfigError(f"--score takes pairs PGNM_RUN BASELINE_RUN (or a list file of them), "
                          f"not {len(paths)} run(s)")
    return list(zip(paths[::2], paths[1::2]))


def checkpoint_of(run: Path) -> Path:
    """A run folder's ``best.pt`` (else ``last.pt``), or the checkpoint file given."""
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            if (run / name).is_file():
                return run / name
        raise ConfigError(f"--score {run}: the run folder has no best.pt or last.pt")
    if not run.exists():
        raise ConfigError(f"--score {run} does not exist")
    return run


def _describe(path: Path, state) -> dict:
    return {"run": str(path.parent if path.name in ("best.pt", "last.pt") else path),
            "checkpoint": str(path), "stage": state.stage,
            "epochs": state.train_config.epochs, "seed": state.train_config.seed}


def score_pairs(pairs, data=None, device=None, resamples: int = 1000, log=print):
    """Each pair's test scores as `compare` records them: ``(per_seed, logits, labels,
    seed_list, described pairs, data)``."""
    files = [(checkpoint_of(a), checkpoint_of(b)) for a, b in pairs]
    states = [(load_run_state(a), load_run_state(b)) for a, b in files]  # checked before scoring
    if data is None:
        data = states[0][0].data
        if not data:
            raise DataError(f"{files[0][0]} does not name its data set: pass --data")
    seeds = [sa.train_config.seed for sa, _ in states]
    seed_list = seeds if len(set(seeds)) == len(seeds) else list(range(len(seeds)))
    per_seed, logits, labels, described = {}, {"baseline": [], "pgnm": []}, None, []
    for s, (a, b), (sa, sb) in zip(seed_list, files, states):
        log(f"compare --score: seed {s}: PGNM {a} vs baseline {b}")
        (x_b, lab, _), (x_a, lab_a, _) = (
            predict_checkpoint(f, data, "test", device=device, log=log, show_progress=False)
            for f in (b, a))
        if not np.array_equal(lab, lab_a) or (labels is not None and
                                              not np.array_equal(labels, lab)):
            raise DataError(f"{a} and {b} were not scored on the same test images (trained on "
                            f"different data, or other classes?)")
        labels = lab
        record_seed(per_seed, logits, s, x_b, x_a, lab, resamples,
                    {"pgnm": str(a.parent), "baseline": str(b.parent)})
        described.append({"pgnm": _describe(a, sa), "baseline": _describe(b, sb)})
    return per_seed, logits, labels, seed_list, described, data


def default_out() -> Path:
    return Path("runs") / f"compare-score-{time.strftime('%Y%m%d-%H%M%S')}"
