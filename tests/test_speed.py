"""The speed settings (pgnm_fast/speed.py) reach the trainer and the loaders; where they cannot
apply, one line says so (CPU, seconds each)."""
import pytest
import torch
from click.testing import CliRunner

from pgnm_fast import engine, speed
from pgnm_fast.cli import main
from pgnm_fast.pipelines import make_loader
from pgnm_fast.run_state import load_checkpoint
from pgnm_fast.synth import make_synthetic

SMALL = ["--epochs", "1", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "4", "--grid", "8", "--loader", "torch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=120, seed=5, size=40)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _nhwc_only(t):  # NHWC memory that is not also NCHW-contiguous (C > 1, H*W > 1)
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.fixture
def seen(monkeypatch):
    """The images each heated step receives and the classifier's second conv weight."""
    got = []
    real = engine.HeatedStep.__call__

    def spy(self, images, target, stats):
        got.append((images.is_contiguous(memory_format=torch.channels_last),
                    _nhwc_only(self.model.layer1[0].conv1.weight),
                    _nhwc_only(engine.unwrap(self.policy).fe.layer1[0].conv1.weight)))
        return real(self, images, target, stats)
    monkeypatch.setattr(engine.HeatedStep, "__call__", spy)
    return got


def test_compile_with_graphs_is_refused_in_one_line(data, tmp_path):
    r = cli("train", "--data", data, "--out", tmp_path / "r", "--compile", "--graphs", *SMALL)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"Error: {speed.COMPILE_WITH_GRAPHS}"]
    assert not (tmp_path / "r").exists()


def test_compile_without_a_compiler_says_so_and_runs_without(data, tmp_path, monkeypatch):
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(self))
    r = cli("train", "--data", data, "--out", tmp_path / "r", "--compile", *SMALL)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("--compile")]
    assert lines == ["--compile: torch.compile needs a C++ compiler (g++ or clang++) for the CPU; "
                     "running without"]
    assert calls == []


def test_compile_compiles_classifier_and_policy_in_place(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "compile_blocked", lambda device: None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    r = cli("train", "--data", data, "--out", tmp_path / "r", "--torchcompile", *SMALL)
    assert r.exit_code == 0, r.output
    assert sorted(calls) == ["PolicyNet", "ResNet"]
    assert "--compile: classifier and policy compiled" in r.output
    # in place: the checkpoint's keys are the plain module's (no _orig_mod. prefix)
    assert not any("_orig_mod" in k for k in load_checkpoint(tmp_path / "r" / "last.pt")["model"])


@pytest.mark.slow
def test_channels_last_reaches_model_policy_and_batches(data, tmp_path, seen):
    r = cli("train", "--data", data, "--out", tmp_path / "r", "--channels-last", *SMALL)
    assert r.exit_code == 0, r.output
    batch_nhwc, model_nhwc, policy_nhwc = seen[0]  # 1-channel batches: NCHW is NHWC too
    assert batch_nhwc and model_nhwc and policy_nhwc  # (the loader test checks 3 channels)
    cfg = load_checkpoint(tmp_path / "r" / "last.pt")["config"]
    assert cfg["channels_last"] is True and cfg["compile"] is False


def test_cpu_defaults_nchw_and_foreach_sgd(data, tmp_path, seen):
    r = cli("train", "--data", data, "--out", tmp_path / "r", *SMALL)
    assert r.exit_code == 0, r.output
    assert not seen[0][1] and not seen[0][2]  # use_channels_last: off on the CPU by default
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    for key in ("optimizer", "policy_optimizer"):
        group = last[key]["param_groups"][0]
        assert group["foreach"] is True and not group.get("fused")


def test_defaults_per_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert speed.use_channels_last(None, cuda) and not speed.use_channels_last(None, cpu)
    assert speed.use_channels_last(True, cpu) and not speed.use_channels_last(False, cuda)
    assert speed.sgd_kind(cuda) == {"fused": True} and speed.sgd_kind(cpu) == {"foreach": True}


@pytest.mark.parametrize("workers", [0, 1])
def test_plain_loader_hands_nhwc_batches(data, workers):
    kw = dict(train=True, batch_size=8, crop_size=24, resize_size=28, channels=3, workers=workers,
              backend="torch")
    torch.manual_seed(0)  # workers=0 augments with the global generator
    images, _ = next(iter(make_loader(data, channels_last=True, **kw)))
    assert _nhwc_only(images)
    torch.manual_seed(0)
    plain, _ = next(iter(make_loader(data, **kw)))
    assert plain.is_contiguous() and not _nhwc_only(plain)
    torch.testing.assert_close(images, plain, rtol=0, atol=0)  # same seed, same batch


def test_the_plan_decides_graphs_layout_and_buffers_once_with_the_reason():
    from pgnm_fast.config import make_config
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphed = make_config("heated", "tiny", graphs=True)
    plan = speed.plan_execution(graphed, cuda)
    assert (plan.graphs, plan.static_buffers, plan.channels_last) == (True, True, True)
    assert plan.graphs_blocked is None and plan.memory_format == torch.channels_last
    on_cpu = speed.plan_execution(graphed, cpu)
    assert not on_cpu.graphs and not on_cpu.static_buffers and not on_cpu.channels_last
    assert "need a GPU" in on_cpu.graphs_blocked and on_cpu.memory_format == torch.preserve_format
    under_torchrun = speed.plan_execution(graphed, cuda, distributed=True)
    assert not under_torchrun.graphs and "torchrun" in under_torchrun.graphs_blocked
    eager = speed.plan_execution(make_config("heated", "tiny", graphs=False), cuda)
    assert not eager.graphs and eager.graphs_blocked is None and eager.channels_last
