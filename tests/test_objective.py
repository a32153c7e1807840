import math

import torch

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
