"""--graphs with gradient accumulation: one captured graph per micro-batch position, replayed in
turn, equals the eager accumulated steps (through test_graphs.py's emulation of capture)."""
import pytest
import torch
from test_graphs import _assert_same, _batches, _eager, emulated_capture

from pgnm_fast.engine import N_STATS, HeatedStep, PlainStep
from pgnm_fast.graphs import GraphedStep
from pgnm_fast.kernels import ReferenceMasker
from pgnm_fast.models import PolicyNet, create_model

ACCUM = 3


def _plain():
    torch.manual_seed(0)
    model = create_model("resnet10t", 5, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, [opt], PlainStep(model, opt, False, torch.device("cpu"), accum_steps=ACCUM)


def _heated():
    torch.manual_seed(0)
    model, policy = create_model("resnet10t", 5, in_chans=1), PolicyNet(grid=8, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    popt = torch.optim.SGD(policy.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    step = HeatedStep(model, policy, ReferenceMasker(8, 32), opt, popt, False,
                      torch.device("cpu"), accum_steps=ACCUM, reward_group=3)
    return torch.nn.ModuleList([model, policy]), [opt, popt], step


def _train(build, graphed, batches, lr_change_at):
    modules, optimizers, step = build()
    torch.manual_seed(123)  # the reference masker draws from the global generator
    stats = torch.zeros(N_STATS)
    runner = GraphedStep(step, optimizers, warmup=2, log=lambda *_: None,
                         capture=emulated_capture, warm=_eager) if graphed else step
    for i, (images, target) in enumerate(batches):
        if i == lr_change_at:
            for o in optimizers:
                for g in o.param_groups:
                    g["lr"] *= 0.5
        runner(images, target, stats)
    return {k: v.clone() for k, v in modules.state_dict().items()}, stats, runner


@pytest.mark.slow
@pytest.mark.parametrize("build", [_plain, _heated], ids=["plain", "heated"])
def test_replayed_accumulated_steps_equal_eager_ones(build):
    """12 micro-batches, 4 optimiser steps of 3: warm-up until the first step ends (3), a
    capture of 3 graphs, a learning-rate change at the third step's start (re-capture)."""
    batches = _batches(4 * ACCUM)
    eager, eager_stats, _ = _train(build, False, batches, lr_change_at=2 * ACCUM)
    replayed, stats, runner = _train(build, True, batches, lr_change_at=2 * ACCUM)
    assert runner.captures == 2 and len(runner.replays) == ACCUM and runner.eager_reason is None
    _assert_same(replayed, eager)
    torch.testing.assert_close(stats, eager_stats, rtol=1e-5, atol=1e-5)
