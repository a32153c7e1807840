import math

import pytest
import torch

from pgnm_fast.engine import N_STATS, PlainStep
from pgnm_fast.errors import ConfigError
from pgnm_fast.objective import pgnm_loss


def test_objective_equals_hand_computation():
    S = torch.tensor([8.0, 10.0])
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([0, 1])
    ce0 = -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))
    ce1 = -(0.5 - math.log(2 * math.exp(0.5) + math.exp(3.0)))
    ce = (ce0 + ce1) / 2
    loss, got_ce = pgnm_loss(S, logits, target)
    assert got_ce.item() == torch.tensor(ce).float().item() or abs(got_ce.item() - ce) < 1e-6
    assert abs(loss.item() - 9.0 * ce) < 1e-5


def test_objective_gradients_reinforce_and_scaled_ce():
    """d loss / d S[b] = CE / B (REINFORCE, reward -CE, no baseline); d loss / d logits = mean(S) * dCE."""
    g = torch.Generator().manual_seed(0)
    S = (torch.rand(4, generator=g) * 5 + 5).requires_grad_()
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 6, (4,), generator=g)
    loss, ce = pgnm_loss(S, logits, target)
    loss.backward()
    torch.testing.assert_close(S.grad, torch.full((4,), ce.item() / 4))
    l2 = logits.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(l2, target).backward()
    torch.testing.assert_close(logits.grad, l2.grad * S.detach().mean())


def test_reward_group_is_the_mean_over_groups_of_the_product():
    g = torch.Generator().manual_seed(1)
    S = torch.rand(6, generator=g) * 5 + 5
    logits = torch.randn(6, 4, generator=g)
    target = torch.randint(0, 4, (6,), generator=g)
    per_image = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    hand = sum(S[i:i + 2].mean() * per_image[i:i + 2].mean() for i in range(0, 6, 2)) / 3
    loss, ce = pgnm_loss(S, logits, target, group=2)
    torch.testing.assert_close(loss, hand)
    torch.testing.assert_close(ce, per_image.mean())
    assert abs(loss - pgnm_loss(S, logits, target)[0]) > 1e-4  # the covariance term
    for whole in (None, 6, 12):  # no group, or one as large as the batch: the published form
        assert torch.equal(pgnm_loss(S, logits, target, group=whole)[0], S.mean() * ce)


def test_a_reward_group_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ConfigError, match="reward group of 4 images must divide the batch of 6"):
        pgnm_loss(torch.ones(6), torch.zeros(6, 3), torch.zeros(6, dtype=torch.long), group=4)


@pytest.mark.parametrize("steps", [0, 1.5])
def test_accumulation_needs_a_positive_whole_number(steps):
    with pytest.raises(ConfigError, match="--accum-steps must be a positive whole number"):
        PlainStep(torch.nn.Linear(2, 2), None, False, torch.device("cpu"), accum_steps=steps)


def test_plain_accumulation_equals_one_batch():
    """3 micro-batches of 4 accumulated equal one batch of 12 (a network without batch
    statistics, float64), clipping included; the optimiser steps once, at the third."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    nets = []
    for steps in (1, 3):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        net = net.double()
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        step = PlainStep(net, opt, False, torch.device("cpu"), clip_grad_norm=0.3,
                         accum_steps=steps)
        stats = torch.zeros(N_STATS, dtype=torch.float64)
        for i in range(steps):
            before = [p.clone() for p in net.parameters()]
            step(x[i * 12 // steps:(i + 1) * 12 // steps], y[i * 12 // steps:(i + 1) * 12 // steps], stats)
            moved = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
            assert moved == (i == steps - 1)
        assert stats[4] == 12
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
