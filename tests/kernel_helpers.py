"""Shared set-up of the kernel tests: where the Triton code runs, and a skip when it cannot."""
import importlib.util
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")

# Triton on CUDA when there is a GPU, else the same Triton code under the interpreter
requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE,
                                     reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")
