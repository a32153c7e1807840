"""Fixtures of the pipelines tests: the conftest data set packed once, and small MedMNIST-layout
``.npz`` files (the root conftest makes the synthetic PNG sets)."""
import pytest
from medmnist_files import write_medmnist

from pgnm_fast.pipelines.pack import pack


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def packed(synth_root, tmp_path_factory):
    """The root conftest's data set packed by 2 worker processes in chunks of 64 records; read
    only."""
    out = tmp_path_factory.mktemp("pack") / "cache"
    pack(synth_root, out, workers=2, chunk_size=64, log=quiet)
    return out


@pytest.fixture(scope="session")
def medmnist_npz(tmp_path_factory):
    """A small grey MedMNIST-layout file (28 px, 4 classes); read only."""
    return write_medmnist(tmp_path_factory.mktemp("medmnist") / "tinymnist.npz")
