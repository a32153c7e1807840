"""make_loader picks a loader by name from LOADERS; every loader keeps the BatchLoader contract."""
import pytest
import torch

from pgnm_fast.errors import ConfigError
from pgnm_fast.pipelines import BatchLoader, factory, make_loader, open_source
from pgnm_fast.pipelines.dali import dali_available


def quiet(*_):
    pass


@pytest.mark.parametrize("backend", ["torch", "device", "dali"])
def test_every_loader_keeps_the_contract(packed, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    split = open_source(packed).split("train")
    loader = make_loader(split, train=True, batch_size=8, crop_size=24, resize_size=28,
                         backend=backend, workers=0, log=quiet)
    assert isinstance(loader, BatchLoader)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 24, 24) and labels.shape == (8,) and len(loader) > 0
    assert isinstance(loader.name, str) and loader.name


def test_a_fourth_loader_is_one_entry_in_LOADERS(synth_root, monkeypatch):
    seen = {}

    class Fixed:
        batch_size, static, buffers, name = 4, False, None, "a fixed batch"

        def __init__(self, data, **options):
            seen.update(options, files=len(data.files))

        def __iter__(self):
            yield torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)

        def __len__(self):
            return 1

        def set_epoch(self, epoch):
            pass

    monkeypatch.setitem(factory.LOADERS, "fixed", Fixed)
    loader = make_loader(synth_root, train=True, batch_size=4, backend="fixed", log=quiet)
    assert isinstance(loader, Fixed) and isinstance(loader, BatchLoader)
    assert seen["common"]["batch_size"] == 4 and seen["files"] > 0 and seen["scan"] is not None
    with pytest.raises(ConfigError, match="auto, device, dali, torch, fixed, not 'nope'"):
        make_loader(synth_root, train=True, batch_size=4, backend="nope", log=quiet)
