"""--graphs: the GraphedStep logic, on the CPU, through an emulation of CUDA-graph capture.

``emulated_capture`` keeps what a CUDA graph keeps and nothing else: it records every ATen op the
step runs (forward, autograd's backward, the optimisers' foreach updates), with its tensors by
identity and its scalars by value, then undoes the recording's effects (capture runs nothing).
A replay re-runs exactly those ops on the same tensors and copies each result into the tensor
the capture produced, so a learning rate is baked in as a captured SGD step bakes it, inputs are
read from the captured tensors only, and Python code does not run again. A host sync during
capture (``.item()``, ``.tolist()``, a data-dependent shape) raises, as it fails on a GPU.
So a replayed run equals the eager run only if GraphedStep copies each batch in, re-captures
when a hyper-parameter moves, and moves the metrics out. The GPU itself is tested in
test_graphs_gpu.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pgnm_fast.engine import N_STATS, HeatedStep, PlainStep
from pgnm_fast.graphs import GraphedStep
from pgnm_fast.kernels import ReferenceMasker
from pgnm_fast.models import PolicyNet, create_model

SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.masked_select.default}
# ops that write to arguments their schema does not mark as written: BatchNorm's running stats
UNMARKED_WRITES = {torch.ops.aten.native_batch_norm.default: (3, 4)}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.saved = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise RuntimeError(f"host sync during capture: {func}")
        schema_args = func._schema.arguments
        flat = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]]
        unmarked = UNMARKED_WRITES.get(func, ())
        for i, (a, value) in enumerate(zip(schema_args, flat)):
            if (a.alias_info is not None and a.alias_info.is_write) or i in unmarked:
                for t in tree_flatten(value)[0]:
                    if isinstance(t, torch.Tensor) and id(t) not in self.saved:
                        self.saved[id(t)] = (t, t.clone())  # its value before the capture
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def emulated_capture(fn):
    rng = torch.get_rng_state()
    recorder = _Recorder()
    with recorder:
        fn()
    with torch.no_grad():
        # capture ran nothing: latest snapshot first, so where views of the same memory were
        # saved twice the earliest (the value before the capture) is written last
        for tensor, before in reversed(list(recorder.saved.values())):
            tensor.copy_(before)
    torch.set_rng_state(rng)

    def replay():
        with torch.no_grad():
            for func, args, kwargs, out in recorder.ops:
                result = func(*args, **kwargs)
                for o, r in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                    if isinstance(o, torch.Tensor) and o is not r:
                        o.copy_(r)
    return replay


def _eager(fn):
    return fn()


def _batches(n, batch=6, size=32, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def _plain(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet10t", 5, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, [optimizer], PlainStep(model, optimizer, False, torch.device("cpu"))


def _heated(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet10t", 5, in_chans=1)
    policy = PolicyNet(grid=8, in_chans=1)
    masker = ReferenceMasker(8, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    popt = torch.optim.SGD(policy.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    step = HeatedStep(model, policy, masker, opt, popt, False, torch.device("cpu"))
    return torch.nn.ModuleList([model, policy]), [opt, popt], step


def _train(build, graphed: bool, batches, lr_change_at=None, static=False, cls=GraphedStep):
    """Run the step over the batches (lrs halved from step ``lr_change_at`` on, as a schedule
    would); returns the final state, the stats and the GraphedStep (or None)."""
    modules, optimizers, step = build()
    torch.manual_seed(123)  # the reference masker draws from the global generator
    stats = torch.zeros(N_STATS)
    runner = cls(step, optimizers, warmup=2, static_inputs=static, log=lambda *_: None,
                 capture=emulated_capture, warm=_eager) if graphed else step
    held = (torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1]))
    for i, (images, target) in enumerate(batches):
        if i == lr_change_at:
            for o in optimizers:
                for g in o.param_groups:
                    g["lr"] *= 0.5
        if static:  # a loader that fills the same two tensors every step
            held[0].copy_(images)
            held[1].copy_(target)
            images, target = held
        runner(images, target, stats)
    state = {k: v.clone() for k, v in modules.state_dict().items()}
    return state, stats, runner if graphed else None


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_plain, _heated], ids=["plain", "heated"])
def test_replayed_steps_equal_eager_steps_across_a_learning_rate_change(build):
    batches = _batches(7)
    eager, eager_stats, _ = _train(build, False, batches, lr_change_at=5)
    graphed, graphed_stats, runner = _train(build, True, batches, lr_change_at=5)
    assert runner.eager_reason is None
    assert runner.captures == 2  # after the warm-up, and again when the lr moved
    _assert_same(graphed, eager)
    torch.testing.assert_close(graphed_stats, eager_stats, rtol=1e-5, atol=1e-5)
    assert graphed_stats[4] == 7 * 6  # every step's images counted once
    start = build()[0].state_dict()
    moved = sum(not torch.equal(start[k], graphed[k]) for k in start)
    assert moved > len(start) // 2  # training did happen


def test_a_stale_learning_rate_would_be_caught():
    """The emulation bakes the lr in: replaying the first graph after the change diverges."""
    batches = _batches(6)
    eager, _, _ = _train(_plain, False, batches, lr_change_at=4)

    class NoRecapture(GraphedStep):
        def _hyper(self):
            return ()

    stale, _, runner = _train(_plain, True, batches, lr_change_at=4, cls=NoRecapture)
    assert runner.captures == 1
    diff = max((eager[k].float() - stale[k].float()).abs().max().item() for k in eager)
    assert diff > 1e-4


def test_static_loader_buffers_are_read_without_a_copy():
    batches = _batches(5)
    eager, _, _ = _train(_plain, False, batches)
    graphed, _, runner = _train(_plain, True, batches, static=True)
    _assert_same(graphed, eager)
    assert runner.captures == 1 and runner.inputs[0].data_ptr() != 0


def test_a_batch_of_another_shape_runs_eagerly_and_keeps_the_graph():
    model, optimizers, step = _plain()
    runner = GraphedStep(step, optimizers, warmup=1, log=lambda *_: None,
                         capture=emulated_capture, warm=_eager)
    stats = torch.zeros(N_STATS)
    for images, target in _batches(3) + _batches(1, batch=4) + _batches(1, seed=1):
        runner(images, target, stats)
    assert runner.captures == 1 and stats[4] == 3 * 6 + 4 + 6


def test_a_failed_capture_is_reported_once_and_the_run_goes_on_eagerly():
    said = []

    def step_with_a_sync(images, target, stats):
        stats[4] += float(images.sum())  # .item(): a host sync, which capture cannot hold

    runner = GraphedStep(step_with_a_sync, [], warmup=1, log=said.append,
                         capture=emulated_capture, warm=_eager)
    stats = torch.zeros(N_STATS)
    batches = _batches(4)
    for images, target in batches:
        runner(images, target, stats)
    assert len(said) == 1 and "capturing the step failed (host sync" in said[0]
    assert runner.eager_reason is not None and runner.captures == 0
    expected = sum(float(images.sum()) for images, _ in batches)
    assert stats[4].item() == pytest.approx(expected, rel=1e-5)


def test_emulated_capture_keeps_scalars_and_runs_nothing():
    """The emulation itself: capture leaves the state alone, replay re-reads its inputs."""
    x, acc = torch.ones(3), torch.zeros(3)
    scale = 2.0

    def fn():
        acc.add_(F.relu(x) * scale)

    replay = emulated_capture(fn)
    assert torch.equal(acc, torch.zeros(3))
    scale = 5.0  # noqa: F841 - a Python scalar changed after capture is not seen
    x.fill_(3.0)
    replay()
    assert torch.equal(acc, torch.full((3,), 6.0))


def test_a_prologue_that_fills_the_inputs_is_captured_with_the_step():
    """A prologue in the form of the device loader's fill (the batch picked from static tensors
    by a counter tensor, the counter advanced in place) runs in the warm-up steps and is
    recorded with the step: the replays step over every batch once, as the eager run does."""
    batches = _batches(6)
    eager, eager_stats, _ = _train(_plain, False, batches)
    images = torch.stack([b[0] for b in batches])
    targets = torch.stack([b[1] for b in batches])
    held = (torch.empty_like(images[0]), torch.empty_like(targets[0]))
    counter = torch.zeros(1, dtype=torch.int64)

    def prologue():
        held[0].copy_(images.index_select(0, counter)[0])
        held[1].copy_(targets.index_select(0, counter)[0])
        counter.add_(1)

    modules, optimizers, step = _plain()
    with pytest.raises(ValueError, match="static_inputs"):
        GraphedStep(step, optimizers, prologue=prologue)
    runner = GraphedStep(step, optimizers, warmup=2, static_inputs=True, prologue=prologue,
                         log=lambda *_: None, capture=emulated_capture, warm=_eager)
    stats = torch.zeros(N_STATS)
    torch.manual_seed(123)
    for _ in batches:
        runner(*held, stats)
    assert runner.captures == 1 and runner.eager_reason is None and int(counter) == 6
    _assert_same({k: v.clone() for k, v in modules.state_dict().items()}, eager)
    torch.testing.assert_close(stats, eager_stats, rtol=1e-5, atol=1e-5)
