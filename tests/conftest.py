"""Shared fixtures: one small synthetic data set per test run, in both layouts."""
import os

# Triton chooses interpreted or compiled code when a kernel is decorated (@triton.jit), so this must
# run before anything imports triton: without a CUDA device, the kernel tests run the Triton code
# itself under the interpreter (TRITON_INTERPRET=1) on CPU tensors. An explicit setting wins.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import shutil

import pytest

from pgnm_fast.synth import make_synthetic

SYNTH = dict(images=260, seed=3, size=48)  # 20 images per class, 13 classes


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """The RadImageNet layout (RadiologyAI_*.csv + radiology_ai/), generated once; read only."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "rin", layout="radimagenet", **SYNTH)


@pytest.fixture(scope="session")
def synth_folders_root(tmp_path_factory):
    """The same images and splits in the class-folder layout; read only."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "folders", layout="folders", **SYNTH)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """240 images of 40 px (RadImageNet layout) for tests that train through the CLI; read only."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "small", images=240, seed=5, size=40)


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private, writable copy of the RadImageNet-layout set, for tests that break it."""
    return shutil.copytree(synth_root, tmp_path / "rin")


@pytest.fixture
def folders_copy(synth_folders_root, tmp_path):
    """A private, writable copy of the class-folder set."""
    return shutil.copytree(synth_folders_root, tmp_path / "folders")


@pytest.fixture
def ctrl_c_in_epoch(monkeypatch):
    """``disarm = ctrl_c_in_epoch(n)``: training runs stop with Ctrl-C as epoch ``n`` starts,
    until ``disarm()``."""
    import pgnm_fast.stages as stages
    real = stages.train_one_epoch

    def arm(n):
        def interrupted(step, loader, device, epoch, *args, **kwargs):
            if epoch == n:
                raise KeyboardInterrupt
            return real(step, loader, device, epoch, *args, **kwargs)

        monkeypatch.setattr(stages, "train_one_epoch", interrupted)
        return lambda: monkeypatch.setattr(stages, "train_one_epoch", real)

    return arm
