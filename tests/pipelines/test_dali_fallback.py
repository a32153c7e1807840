"""Without DALI (as on a GPU host where it is not installed): the package imports, `auto` falls back to
the plain loader and says so once, `--loader dali` is a one-line error, training runs."""
import sys

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from pgnm_fast.cli import main
from pgnm_fast.errors import ConfigError, DataError
from pgnm_fast.pipelines import dali, factory, make_loader, open_source


@pytest.fixture
def no_dali(monkeypatch):
    """Make `import nvidia.dali` fail, as where it is not installed."""
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import raises ImportError
    monkeypatch.setattr(factory, "_told", set())
    dali.dali_available.cache_clear()
    yield
    dali.dali_available.cache_clear()


def test_auto_falls_back_to_the_plain_loader_and_says_so_once(no_dali, synth_root):
    assert not dali.dali_available()
    split = open_source(synth_root).split("val")
    logs = []
    loaders = [make_loader(split, train=False, batch_size=8, crop_size=16, workers=0,
                           log=logs.append) for _ in range(2)]
    assert all(isinstance(loader, DataLoader) for loader in loaders)
    assert logs == ["DALI is not installed: data loading uses the plain PyTorch loader"]
    x, y = next(iter(loaders[0]))
    assert x.shape == (8, 1, 16, 16) and y.dtype == torch.int64
    with pytest.raises(ConfigError, match="--loader dali: DALI is not installed"):
        make_loader(split, train=False, batch_size=8, backend="dali")
    with pytest.raises(DataError, match="DALI is not installed"):
        dali.DaliLoader(split, train=False, batch_size=8)
    with pytest.raises(ConfigError, match="--loader must be one of"):
        make_loader(split, train=False, batch_size=8, backend="fast")


def test_training_runs_without_dali(no_dali, synth_root, tmp_path):
    r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(synth_root), "--out",
                                  str(tmp_path / "run"), "--epochs", "1", "-b", "16",
                                  "--train-crop-size", "16", "--val-resize-size", "18",
                                  "--val-crop-size", "16", "-j", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("DALI is not installed") == 1
    r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(synth_root), "--out",
                                  str(tmp_path / "run2"), "--loader", "dali", "-j", "0"])
    assert r.exit_code == 2 and "Error: --loader dali: DALI is not installed" in r.output
