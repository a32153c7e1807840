"""The heated step under bf16 autocast (``amp=True``, on the CPU) against the float32 step.

Tolerances, from bf16's 8 significant bits (unit roundoff u = 2^-9, about 2e-3): every bf16
layer rounds its inputs and output to u, so a value that passes through the networks carries a
relative error of a few u.

- loss and CE: the batch means of such values: relative 4u (measured: about 0.03u);
- S per image: float32 from a~ = 0.9 A + 0.1 h, only the head term rounded: relative 2u
  (measured: 0.1u);
- gradients: a layer followed by BatchNorm gets its weight gradient from BatchNorm's backward,
  which subtracts the batch means and cancels most digits (elements differ by 20-30% here), so
  elementwise bounds would say nothing. Per network: the gradient's norm within a factor
  1 +- 4u (rounding errors are uncorrelated with the gradient and add in quadrature; measured
  0.2u) and cosine with the float32 gradient at least 0.9 (measured 0.97);
- updated weights: a first SGD step moves by -lr (g + wd w), so the update's norm within
  1 +- 4u and its relative error at most sqrt(2 (1 - 0.9)) = 0.45, from the gradient's bounds;
- base buffers: they move by 0.01 (mean h - A), h rounded once more to bf16 as the heads'
  output: relative 4u of the move (measured: 1.6u).

A scale of 1 + 2^-5 on the loss fails the loss and gradient-norm bounds. The step must also
run bf16 (the classifier reads bf16 under autocast) and differ from the float32 step.
"""
from __future__ import annotations

import pytest
import torch

from kernels.reference import ReferenceMasker, beta_log_prob, stable_logsumexp
from pgnm_fast.engine import N_STATS, HeatedStep
from pgnm_fast.models import PolicyNet, create_model

GRID, SIZE, BATCH, CLASSES = 4, 32, 16, 5
LR, POLICY_LR = 0.1, 0.01


class FixedDraws(ReferenceMasker):
    """The reference mask step with the draw m fixed (the same cells in both precisions, so
    the comparison sees the arithmetic, not a draw moved by rounding); S in float32 as the
    reference computes it. Keeps S, and the dtype of the masked images the classifier reads."""

    def __init__(self, m):
        super().__init__(GRID, SIZE)
        self.m = m

    def sample_score(self, a_tilde, b_tilde):
        with torch.autocast("cpu", enabled=False):
            S = stable_logsumexp(beta_log_prob(self.m, a_tilde.float().exp(), b_tilde.float().exp()))
        self.S = S.detach()
        return self.m, S

    def apply(self, images, m):
        out = super().apply(images, m)
        self.logits_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") \
            else out.dtype
        return out


def run(amp: bool, scale: float = 1.0):
    torch.manual_seed(0)
    model, policy = create_model("resnet10t", CLASSES), PolicyNet(grid=GRID)
    with torch.no_grad():
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)  # timm's zero-initialised last BN would hide the trunk
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    target = torch.randint(0, CLASSES, (BATCH,), generator=g)
    masker = FixedDraws(torch.rand(BATCH, GRID * GRID, generator=g).clamp(0.01, 0.99))
    before = [p.detach().clone() for p in (*model.parameters(), *policy.parameters())]
    bases = (policy.base_alpha.clone(), policy.base_beta.clone())
    sgd = dict(momentum=0.9, weight_decay=1e-4)
    step = HeatedStep(model, policy, masker, torch.optim.SGD(model.parameters(), lr=LR, **sgd),
                      torch.optim.SGD(policy.parameters(), lr=POLICY_LR, **sgd), amp=amp,
                      device=torch.device("cpu"))
    stats = torch.zeros(N_STATS)
    step(images, target, stats)
    params = list(model.parameters()), list(policy.parameters())
    return dict(logits=masker.logits_dtype, loss=stats[0] / BATCH, ce=stats[1] / BATCH, S=masker.S,
                grads=[torch.cat([p.grad.flatten() for p in ps]) for ps in params],
                updates=[torch.cat([(p.detach() - b).flatten() for p, b in zip(ps, bs)])
                         for ps, bs in zip(params, (before[:len(params[0])], before[len(params[0]):]))],
                bases=[(b_new - b).flatten() for b_new, b in
                       zip((policy.base_alpha, policy.base_beta), bases)])


U = 2.0 ** -9  # bf16's unit roundoff


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def steps():
    return run(False), run(True)


def test_amp_step_runs_bf16_and_differs_from_float32(steps):
    ref, amp = steps
    assert (ref["logits"], amp["logits"]) == (torch.float32, torch.bfloat16)
    assert amp["loss"] != ref["loss"] and not torch.equal(amp["grads"][0], ref["grads"][0])


def test_amp_loss_and_score_within_bf16_rounding(steps):
    ref, amp = steps
    assert abs(amp["loss"] / ref["loss"] - 1) < 4 * U
    assert abs(amp["ce"] / ref["ce"] - 1) < 4 * U
    assert ((amp["S"] - ref["S"]).abs() / ref["S"].abs()).max() < 2 * U


def test_amp_gradients_and_updates_within_bf16_rounding(steps):
    ref, amp = steps
    for key in ("grads", "updates"):
        for a, r in zip(amp[key], ref[key]):
            assert abs(a.norm() / r.norm() - 1) < 4 * U, key
            assert torch.dot(a, r) / (a.norm() * r.norm()) > 0.9, key
            assert _rel(a, r) < 0.45, key
    for a, r in zip(amp["bases"], ref["bases"]):
        assert _rel(a, r) < 4 * U
