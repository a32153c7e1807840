"""``pgnm-fast validate``: the fast mask step against the reference, on fresh random inputs; the
checks and their thresholds are in :mod:`pgnm_fast.kernels.checks`."""
from __future__ import annotations

import json
import sys

import click
import torch

from .kernels.checks import format_table, run_validation


@click.command("validate")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (or cuda:N)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="write every number and 'passed' to this file")
@click.option("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
@click.option("--quick", is_flag=True, help="a smaller sweep")
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="fast path to check: auto = Triton on CUDA, torch on the CPU (triton on the CPU needs "
                   "TRITON_INTERPRET=1)")
def validate(device, json_path, seed, quick, backend):
    """Check the fast mask step against the reference; exit 0 only if every check passes."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available")
    result = run_validation(device=device, seed=seed, quick=quick, backend=backend)
    click.echo(format_table(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":  # python -m pgnm_fast.validate --device cuda --json FILE
    validate()
