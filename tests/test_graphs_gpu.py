"""--graphs on a GPU: real CUDA-graph capture and replay against the eager step, and the
device loader's batch fill captured with a step (its CPU tests: test_device_loader.py).

Not run by CI (no GPU); `bash bench/run_gpu.sh tests` runs it. The CPU tests of the same logic,
through an emulation of capture, are in test_graphs.py.
"""
import pytest
import torch

from pgnm_fast.engine import N_STATS, HeatedStep, PlainStep
from pgnm_fast.graphs import GraphedStep
from pgnm_fast.kernels import FastMasker
from pgnm_fast.models import PolicyNet, create_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _deterministic():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _build(heated: bool, amp: bool):
    torch.manual_seed(0)
    model = create_model("resnet10t", 5, in_chans=1).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if not heated:
        return torch.nn.ModuleList([model]), [opt], PlainStep(model, opt, amp, DEV), None
    policy = PolicyNet(grid=8, in_chans=1).to(DEV)
    masker = FastMasker(8, 64, seed=7).to(DEV)
    popt = torch.optim.SGD(policy.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    step = HeatedStep(model, policy, masker, opt, popt, amp, DEV)
    return torch.nn.ModuleList([model, policy]), [opt, popt], step, masker


def _run(heated, amp, graphed, n=9, lr_change_at=6):
    modules, optimizers, step, masker = _build(heated, amp)
    runner = GraphedStep(step, optimizers, warmup=3, log=print) if graphed else step
    g = torch.Generator(device=DEV).manual_seed(1)
    stats = torch.zeros(N_STATS, device=DEV)
    for i in range(n):
        if i == lr_change_at:
            for o in optimizers:
                for group in o.param_groups:
                    group["lr"] *= 0.5
        images = torch.randn(8, 1, 64, 64, device=DEV, generator=g)
        target = torch.randint(0, 5, (8,), device=DEV, generator=g)
        runner(images, target, stats)
    torch.cuda.synchronize()
    state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    return state, stats, runner if graphed else None, masker


@pytest.mark.parametrize("heated", [False, True], ids=["plain", "heated"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_graph_replay_matches_the_eager_step(heated, amp):
    eager, eager_stats, _, eager_masker = _run(heated, amp, graphed=False)
    graphed, graphed_stats, runner, masker = _run(heated, amp, graphed=True)
    assert runner.eager_reason is None, runner.eager_reason
    assert runner.captures == 2  # after the warm-up, and again when the lr moved
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    for key in eager:
        torch.testing.assert_close(graphed[key].float(), eager[key].float(), msg=key, **tol)
    torch.testing.assert_close(graphed_stats, eager_stats, **tol)
    if heated:  # every replay advanced the mask stream on the device: fresh masks each step
        assert masker.rng_state[1].item() == eager_masker.rng_state[1].item() == 9
        assert not masker.nonfinite.item()


def test_train_with_graphs_on_the_gpu(tmp_path):
    from click.testing import CliRunner

    from pgnm_fast.cli import main
    from pgnm_fast.run_state import load_checkpoint
    from pgnm_fast.synth import make_synthetic
    data = make_synthetic(tmp_path / "synth", images=240, seed=11, size=40)
    out = tmp_path / "run"
    args = ["train", "--data", data, "--out", out, "--device", "cuda", "--graphs", "--amp",
            "--grid", "8", "--epochs", "2", "-b", "16", "--train-crop-size", "32",
            "--val-resize-size", "36", "--val-crop-size", "32", "-j", "0", "--print-freq", "4"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "captured as a CUDA graph" in r.output and "failed" not in r.output
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["masker"]["rng_state"][1].item() >= state["step"]


# --------------------------------------------------------------- --loader device: the fill in the graph
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from pgnm_fast.pipelines.pack import pack
    from pgnm_fast.synth import make_synthetic
    tmp = tmp_path_factory.mktemp("devgraph")
    data = make_synthetic(tmp / "synth", images=240, seed=5, size=40, layout="folders")
    pack(data, tmp / "cache", workers=0, log=lambda *_: None)
    return tmp / "cache"


def _device_loader(cache):
    from pgnm_fast.pipelines import open_source
    from pgnm_fast.pipelines.device import DeviceLoader
    return DeviceLoader(open_source(cache).split("train"), train=True, batch_size=16,
                        crop_size=32, seed=4, device=DEV, static=True, dtype=torch.bfloat16,
                        channels_last=True)


def test_the_device_loaders_fill_replays_in_a_cuda_graph(packed):
    """fill() and a tiny step captured in a real CUDA graph: each replay writes the next batch
    of the epoch, equal to the eager loader's; the eager fills and the replays run under
    ``set_sync_debug_mode("error")`` (any host synchronisation raises)."""
    eager = [(x.clone(), y.clone()) for x, y in _device_loader(packed)]
    ld = _device_loader(packed)
    ld.defer_fill()
    total = torch.zeros((), device=DEV)

    def fill_and_step():
        ld.fill()
        images, labels = ld.buffers
        total.add_(images.float().mean() + labels.float().mean())

    got, graph = [], None
    for i, (images, labels) in enumerate(ld):
        if i == 0:
            fill_and_step()  # Triton compiles here
        elif i == 2:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                fill_and_step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if i == 1:
                fill_and_step()
            elif i >= 2:
                graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        got.append((images.clone(), labels.clone()))
    assert len(got) == len(eager) >= 8
    for i, ((x, y), (xr, yr)) in enumerate(zip(got, eager)):
        assert torch.equal(x, xr) and torch.equal(y, yr), i
    assert int(ld._step) == len(eager) and torch.isfinite(total)


def test_train_with_graphs_and_the_device_loader_on_the_gpu(packed, tmp_path):
    from click.testing import CliRunner

    from pgnm_fast.cli import main
    from pgnm_fast.run_state import load_checkpoint
    out = tmp_path / "run"
    args = ["train", "--data", packed, "--out", out, "--device", "cuda", "--graphs", "--amp",
            "--loader", "device", "--grid", "8", "--epochs", "2", "-b", "16",
            "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
            "-j", "0", "--print-freq", "4"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "the loader's augmentation captured with it" in r.output, r.output
    assert "failed" not in r.output and "resident on cuda" in r.output
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
