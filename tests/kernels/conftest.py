"""Where the kernel tests can run, decided once for tests/kernels/ (as markers):

- ``pytest.mark.triton``: runs the Triton code, compiled on a CUDA device, else under the
  interpreter on CPU tensors (``TRITON_INTERPRET=1``, which tests/conftest.py sets without a GPU);
  skipped where Triton is not installed or neither is possible.
- ``pytest.mark.triton_compiler``: compiles the kernels for NVIDIA targets without a GPU (Triton's
  NVIDIA backend, no CUDA device: a GPU compiles them for real in the other tests).
- ``pytest.mark.gpu``: needs a CUDA device.

The kernel tests put their tensors on ``cuda`` when a GPU is visible, else on the CPU (DEVICE here).
"""
import importlib.util
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
HAS_NVIDIA_BACKEND = HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is not None

# marker -> (can run here, why not)
GATES = {
    "triton": (TRITON_RUNNABLE, "Triton needs CUDA or TRITON_INTERPRET=1"),
    "triton_compiler": (HAS_NVIDIA_BACKEND and DEVICE == "cpu",
                        "needs Triton's NVIDIA backend and no GPU (a GPU compiles the kernels for real)"),
    "gpu": (DEVICE == "cuda", "needs a CUDA device"),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (compiled on CUDA, else interpreted)")
    config.addinivalue_line("markers", "triton_compiler: compiles the kernels for NVIDIA targets without a GPU")


def pytest_runtest_setup(item):
    for name, (runnable, reason) in GATES.items():
        if not runnable and item.get_closest_marker(name) is not None:
            pytest.skip(reason)
