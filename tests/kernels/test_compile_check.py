"""The Triton kernels compile for NVIDIA GPUs (through ptxas, to a cubin) without a GPU at hand.

The interpreter runs the kernels' arithmetic but not the compiler's rules (loop-carried types, dot
shapes, layouts); this catches what only compilation would. It runs pgnm_fast.kernels.compile_check
in a subprocess without TRITON_INTERPRET. Skipped where a GPU is present (the GPU tests compile and run
the kernels for real) or Triton's NVIDIA backend is missing.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.triton_compiler  # tests/kernels/conftest.py
def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, "-m", "pgnm_fast.kernels.compile_check", "90", "80"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 2 * 13
