"""``pgnm-fast validate``: the fast mask step against the reference, on fresh random inputs; the
checks and their thresholds are in :mod:`pgnm_fast.kernels.checks`."""
from __future__ import annotations

import json
import sys

import click
import torch

from .kernels.checks import format_table, run_validation


def validate_command(device, json_path, seed, quick, backend):
    """``pgnm-fast validate`` (its options are in :mod:`pgnm_fast.cli`)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available")
    result = run_validation(device=device, seed=seed, quick=quick, backend=backend)
    click.echo(format_table(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":  # python -m pgnm_fast.validate --device cuda --json FILE
    from pgnm_fast.cli import validate
    validate()
