"""The authors' optimisation, reproduced by one process (docs/method.md §4, §5).

The authors trained the heated stage on 8 GPUs of 32 images each: every GPU computed
``mean_g(S) * CE_g`` over its 32 images and DistributedDataParallel averaged the 8 gradients, so
their objective is the mean over the groups of 32 of ``mean_g(S) * CE_g``; the policy's base
buffers moved by the heads' mean over all 256 images. Three arrangements of one optimiser step
over the same 256 images are compared, in float64 on the CPU:

(a) 8 micro-batches of 32 accumulated (``accum_steps=8``),
(b) one batch of 256 with a reward group of 32 (``reward_group=32``),
(c) 8 gloo processes of 32 under DistributedDataParallel (the authors' arrangement),

and a hand transcription of the authors' per-GPU objective averaged over the 8 groups. The
networks are the real classifier (resnet10t) and policy, in eval mode for the (a) = (b) = (c)
equality: BatchNorm over 256 images normalises with other statistics than BatchNorm over 32,
so with batch statistics (b) is a different function from (a) and (c); eval-mode BatchNorm
(running statistics) is the same function in every arrangement. With train-mode BatchNorm the
micro-batches of (a) equal the per-process BatchNorm of (c) (without SyncBatchNorm, which
needs GPUs), which a second comparison checks. SyncBatchNorm, the authors' setting, normalises
over all 256 images as BatchNorm does in (b): their run is (b), one batch with reward groups.
Every image draws its mask from its own seed (the global index of the image), in every
arrangement, so the draws are the same.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import beta_log_prob, mask_image_matrix, stable_logsumexp, upsample_blur_matrix
from pgnm_fast.engine import N_STATS, HeatedStep
from pgnm_fast.models import PolicyNet, create_model

GRID, SIZE, CLASSES = 4, 16, 5
GROUP, RANKS = 32, 8
BATCH = GROUP * RANKS
LR, POLICY_LR, MOMENTUM, WD = 0.1, 0.01, 0.9, 1e-4


class SeededMasker(torch.nn.Module):
    """The reference mask step in float64; image ``i`` of the global batch draws its mask with
    seed ``1000 + i``. ``start``: the global index of the next batch's first image."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.matrix = upsample_blur_matrix(GRID, SIZE, dtype=torch.float64)
        self.start = start

    def sample_score(self, a_tilde, b_tilde):
        alpha, beta = a_tilde.exp(), b_tilde.exp()
        rows = []
        for j in range(alpha.shape[0]):
            with torch.random.fork_rng():
                torch.manual_seed(1000 + self.start + j)
                rows.append(torch.distributions.Beta(alpha[j].detach(), beta[j].detach()).sample())
        self.start += alpha.shape[0]
        m = torch.stack(rows)
        return m, stable_logsumexp(beta_log_prob(m, alpha, beta), dim=1)

    def apply(self, images, m):
        return images * mask_image_matrix(m, self.matrix)


def _data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(BATCH, 1, SIZE, SIZE, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=g))


def _networks(train: bool):
    torch.manual_seed(0)
    model = create_model("resnet10t", CLASSES).double().train(train)
    policy = PolicyNet(grid=GRID).double().train(train)
    with torch.no_grad():  # running statistics other than 0 / 1, so eval mode is not trivial
        for bn in [m for m in (*model.modules(), *policy.modules())
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)  # timm's zero-initialised last BN would hide the trunk
    return model, policy


def _step(model, policy, start=0, ema_sync=None, **kwargs):
    sgd = dict(momentum=MOMENTUM, weight_decay=WD)
    return HeatedStep(model, policy, SeededMasker(start),
                      torch.optim.SGD(model.parameters(), lr=LR, **sgd),
                      torch.optim.SGD(policy.parameters(), lr=POLICY_LR, **sgd),
                      amp=False, device=torch.device("cpu"), ema_sync=ema_sync, **kwargs)


def _state(model, policy):
    """Parameters and base buffers (running statistics left out: (a) updates them 8 times)."""
    state = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    state.update({f"policy.{k}": v.detach().clone() for k, v in policy.named_parameters()})
    state.update(base_alpha=policy.base_alpha.clone(), base_beta=policy.base_beta.clone())
    return state


def arrangement(kind: str, train: bool = False) -> dict:
    """One optimiser step over the 256 images: ``accumulated`` (a), ``grouped`` (b) or ``whole``
    (one batch of 256 without a reward group, the control)."""
    images, target = _data()
    model, policy = _networks(train)
    stats = torch.zeros(N_STATS, dtype=torch.float64)
    if kind == "accumulated":
        step = _step(model, policy, accum_steps=RANKS)
        for r in range(RANKS):
            part = slice(r * GROUP, (r + 1) * GROUP)
            step(images[part], target[part], stats)
    else:
        step = _step(model, policy, reward_group=GROUP if kind == "grouped" else None)
        step(images, target, stats)
    return _state(model, policy)


def authors_objective() -> dict:
    """Hand transcription of the authors' step: every GPU g computes
    ``loss_g = S_g.mean() * cross_entropy(logits_g, y_g)`` on its 32 images, DDP averages the
    gradients, SGD steps (first step: momentum buffer = gradient + wd * weight), and the bases
    move by 0.01 of the heads' mean over the 256 images minus 0.01 of themselves."""
    images, target = _data()
    model, policy = _networks(False)
    masker, losses, heads = SeededMasker(), [], []
    for r in range(RANKS):
        x, y = images[r * GROUP:(r + 1) * GROUP], target[r * GROUP:(r + 1) * GROUP]
        out = policy(x)
        m, S = masker.sample_score(out.a_tilde, out.b_tilde)
        losses.append(S.mean() * F.cross_entropy(model(masker.apply(x, m)), y))
        heads.append((out.h_a.detach(), out.h_b.detach()))
    named = [(f"model.{k}", p, LR) for k, p in model.named_parameters()]
    named += [(f"policy.{k}", p, POLICY_LR) for k, p in policy.named_parameters()]
    grads = torch.autograd.grad(sum(losses) / RANKS, [p for _, p, _ in named])
    state = {k: (p - lr * (g + WD * p)).detach() for (k, p, lr), g in zip(named, grads)}
    for i, name in enumerate(("base_alpha", "base_beta")):
        mean = torch.cat([h[i] for h in heads]).mean(0, keepdim=True)
        state[name] = 0.99 * getattr(policy, name) + 0.01 * mean
    return state


def _gap(x: dict, y: dict) -> float:
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def grouped():
    return arrangement("grouped")


def test_accumulated_micro_batches_equal_one_grouped_batch(grouped):
    assert _gap(arrangement("accumulated"), grouped) < 1e-10


@pytest.mark.slow
def test_grouped_batch_equals_the_authors_objective(grouped):
    assert _gap(grouped, authors_objective()) < 1e-10


@pytest.mark.slow
def test_without_the_reward_group_the_step_differs(grouped):
    """The control: mean_256(S) * CE_256 differs from the mean over the groups by the
    covariance of S and CE across the groups, well above the comparisons' 1e-10."""
    assert _gap(arrangement("whole"), grouped) > 1e-6


def _rank(rank: int, rendezvous: str, out: str) -> None:
    """One of the 8 gloo processes: its 32 images under DDP, eval-mode and train-mode networks."""
    import torch.distributed as dist

    from pgnm_fast.distributed import all_reduce_mean
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=RANKS)
    images, target = _data()
    part = slice(rank * GROUP, (rank + 1) * GROUP)
    results = {}
    for train in (False, True):
        model, policy = _networks(train)
        ddp = [torch.nn.parallel.DistributedDataParallel(m) for m in (model, policy)]
        step = _step(*ddp, start=rank * GROUP, ema_sync=all_reduce_mean)
        step(images[part], target[part], torch.zeros(N_STATS, dtype=torch.float64))
        results[train] = _state(model, policy)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_eight_gloo_processes_equal_accumulation_and_grouping(grouped, tmp_path):
    """(c) = (b) = (a) with eval-mode BatchNorm, and (c) = (a) with train-mode BatchNorm (each
    process's BatchNorm over its 32 images, each micro-batch's over its 32)."""
    out = tmp_path / "ranks.pt"
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(out)),
                                nprocs=RANKS)
    ranks = torch.load(out)
    assert _gap(ranks[False], grouped) < 1e-10
    assert _gap(ranks[True], arrangement("accumulated", train=True)) < 1e-10
    assert _gap(arrangement("grouped", train=True), ranks[True]) > 1e-6  # BN over 256 differs
