"""``pgnm-fast validate``: the fast paths against their references, on fresh random inputs.

The mask step's checks and their thresholds are in :mod:`pgnm_fast.kernels.checks`; the device
loader's resize and a step captured as a CUDA graph are checked as the training run's self-check
does (:mod:`pgnm_fast.self_check`, never read from its cache here)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
import torch

from .kernels.checks import format_table, run_validation

OTHER_PARTS = {"resized_crop": "resized crop (the device loader's resize against its integer reference)",
               "graphed_step": "captured step (a CUDA graph's step against the eager step)"}


def validate_command(device, json_path, seed, quick, backend):
    """``pgnm-fast validate`` (its options are in :mod:`pgnm_fast.cli`)."""
    from .self_check import run_self_check
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available")
    result = run_validation(device=device, seed=seed, quick=quick, backend=backend)
    others = run_self_check(device, log=lambda line: None, parts=tuple(OTHER_PARTS), cache=False)
    result["other_fast_paths"] = {p: asdict(r) for p, r in others.parts.items()}
    result["passed"] = bool(result["passed"] and others.ok)
    lines = format_table(result).splitlines()[:-1]  # the verdict line comes last, after these
    for part, words in OTHER_PARTS.items():
        r = others.parts[part]
        lines.append(f"{words}: " + ("ok" if r.ok else f"FAIL ({r.error})"))
    lines.append("PASSED" if result["passed"] else "FAILED")
    click.echo("\n".join(lines))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":  # python -m pgnm_fast.validate --device cuda --json FILE
    from pgnm_fast.cli import validate
    validate()
