"""The Triton sample + score kernel (interpreted on the CPU, compiled on a GPU) against the reference.

Statistics: n = 8192 draws per (alpha, beta); every KS test of this file's null sweep is run at
level 0.01 / (number of tests) (Bonferroni, family-wise false alarm below 1%), seeds fixed so CI is
deterministic. At that level and n a one-sample KS test rejects any law whose CDF is 0.023 away
(0.033 for the two-sample test); the wrong samplers below are shown rejected by the same tests.
"""
import math

import numpy as np
import pytest
import torch

from pgnm_fast.kernels import FastMasker
from pgnm_fast.kernels import reference as ref
from pgnm_fast.kernels import sample_score as op
from pgnm_fast.kernels.checks import error_summary, ks_float32, ks_two_sample, rounding_bound, score_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.triton  # tests/kernels/conftest.py

PAIRS = [(0.05, 0.05), (0.05, 5.0), (0.2, 50.0), (1.0, 1.0), (0.5, 0.2), (5.0, 0.05), (50.0, 50.0),
         (2.0, 30.0), (50.0, 0.2)]
LEVEL = 0.01 / (2 * len(PAIRS))
ROWS, GRID = 2, 64


def _const(value, rows=ROWS, grid=GRID):
    return torch.full((rows, grid * grid), math.log(value), device=DEVICE)


def _draw(masker, alpha, beta):
    m, _ = masker.sample_score(_const(alpha), _const(beta))
    return m.flatten().cpu().numpy()


def _reference_draw(alpha, beta, seed):
    torch.manual_seed(seed)
    m, _, _ = ref.sample_and_score(_const(alpha), _const(beta))
    return m.flatten().cpu().numpy()


@pytest.mark.parametrize("alpha,beta", PAIRS)
def test_sampler_follows_beta_law_and_reference(alpha, beta):
    seed = int(alpha * 1000 + beta * 10)
    fast = _draw(FastMasker(GRID, 224, seed=seed, backend="triton").to(DEVICE), alpha, beta)
    assert fast.dtype == np.float32 and fast.min() > 0 and fast.max() < 1
    d2, p2 = ks_two_sample(fast, _reference_draw(alpha, beta, seed))
    d1, p1 = ks_float32(fast, alpha, beta)
    assert p2 > LEVEL, f"two-sample KS vs reference D={d2:.4f} p={p2:.2e}"
    assert p1 > LEVEL, f"one-sample KS vs exact CDF D={d1:.4f} p={p1:.2e}"


@pytest.mark.parametrize("alpha,beta,wrong", [(0.05, 5.0, "swapped"), (2.0, 30.0, "swapped"),
                                              (0.5, 0.2, "swapped"), (2.0, 30.0, "alpha x 1.15"),
                                              (0.2, 50.0, "alpha x 1.15")])
@pytest.mark.slow
def test_same_tests_reject_a_wrong_sampler(alpha, beta, wrong):
    """Power: the tests above, on draws from the wrong law, reject at the same level."""
    masker = FastMasker(GRID, 224, seed=5, backend="triton").to(DEVICE)
    bad = _draw(masker, beta, alpha) if wrong == "swapped" else _draw(masker, alpha * 1.15, beta)
    assert ks_float32(bad, alpha, beta)[1] < LEVEL
    assert ks_two_sample(bad, _reference_draw(alpha, beta, 6))[1] < LEVEL


def test_float32_aware_ks_accepts_torch_near_one_where_plain_ks_rejects():
    """Beta(0.1, 0.1) puts ~19% of its mass within 6e-8 of 1: torch's own sampler fails a plain
    KS test there (all of it sits at the clamp), and passes the float32-aware one."""
    from scipy import stats
    x = _reference_draw(0.1, 0.1, 3)
    assert stats.kstest(x.astype(np.float64), stats.beta(0.1, 0.1).cdf).pvalue < 1e-6
    assert ks_float32(x, 0.1, 0.1)[1] > LEVEL


def test_triton_and_torch_paths_draw_the_same_law():
    for alpha, beta in [(0.2, 0.2), (3.0, 0.5)]:
        tri = _draw(FastMasker(GRID, 224, seed=1, backend="triton").to(DEVICE), alpha, beta)
        tor = _draw(FastMasker(GRID, 224, seed=2, backend="torch").to(DEVICE), alpha, beta)
        assert ks_two_sample(tri, tor)[1] > 1e-3


@pytest.mark.parametrize("rows,grid,dtype", [(2, 64, torch.float32), (3, 16, torch.bfloat16),
                                             (2, 7, torch.float32), (4, 8, torch.float16)])
@pytest.mark.slow
def test_scores_and_gradients_match_float64_on_shared_samples(rows, grid, dtype):
    """log p, S and dS/da~, dS/db~ against float64 on the kernel's own samples; bounds are the
    float32 condition bounds of pgnm_fast.kernels.checks.score_reference (C = 32)."""
    g = torch.Generator().manual_seed(rows * 100 + grid)
    lo, hi = math.log(0.05), math.log(50.0)
    a_t = (torch.rand(rows, grid * grid, generator=g) * (hi - lo) + lo).to(DEVICE, dtype).requires_grad_()
    b_t = (torch.rand(rows, grid * grid, generator=g) * (hi - lo) + lo).to(DEVICE, dtype).requires_grad_()
    grad_s = torch.randn(rows, generator=g).to(DEVICE)
    masker = FastMasker(grid, max(grid, 16), seed=9, backend="triton").to(DEVICE)
    state = masker.rng_state.clone()
    m, logp, _, _, _ = op.sample_score_parts(a_t.detach(), b_t.detach(), state, masker.nonfinite, True)
    m2, s = masker.sample_score(a_t, b_t)
    assert torch.equal(m, m2) and not m2.requires_grad and s.requires_grad and s.shape == (rows,)
    (s * grad_s).sum().backward()
    assert a_t.grad.dtype == dtype and b_t.grad.dtype == dtype
    want, bounds = score_reference(m.cpu(), a_t.detach().cpu(), b_t.detach().cpu(), grad_s.cpu())
    # gradients come back in a~'s dtype: add its rounding (relative, and half its smallest
    # subnormal for float16, whose range is narrower than float32's)
    for name, got in (("logp", logp), ("S", s.detach()), ("grad_a", a_t.grad), ("grad_b", b_t.grad)):
        bound = bounds[name] + (rounding_bound(dtype, want[name]) if name.startswith("grad") else 0)
        err = error_summary(got.float().cpu(), want[name], bound)
        assert err["finite"] and err["norm"] <= 1.0, (name, err)
    # the bound has teeth: the gradient w.r.t. alpha instead of a~ (a missing factor alpha) fails it
    alpha = a_t.detach().double().exp().cpu()
    wrong = error_summary((a_t.grad.double().cpu() / alpha).float(), want["grad_a"], bounds["grad_a"])
    assert wrong["norm"] > 1.0


def test_same_seed_same_masks_and_a_new_draw_every_step():
    a_t, b_t = _const(0.7, 2, 8), _const(1.3, 2, 8)
    one = FastMasker(8, 32, seed=11, backend="triton").to(DEVICE)
    two = FastMasker(8, 32, seed=11, backend="triton").to(DEVICE)
    other = FastMasker(8, 32, seed=12, backend="triton").to(DEVICE)
    m1, s1 = one.sample_score(a_t, b_t)
    m2, _ = one.sample_score(a_t, b_t)
    assert one.rng_state.tolist() == [11, 2]  # advanced on the masker's device, once per call
    n1, t1 = two.sample_score(a_t, b_t)
    assert torch.equal(m1, n1) and torch.equal(s1, t1)
    assert (m1 != m2).float().mean() > 0.99
    assert (m1 != other.sample_score(a_t, b_t)[0]).float().mean() > 0.99
    one.manual_seed(11)
    assert torch.equal(one.sample_score(a_t, b_t)[0], m1)


def _poisoned_empty(shape, dtype=torch.float32, device=None):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def test_every_output_is_written(monkeypatch):
    """Outputs poisoned with NaN before the run: the kernels must overwrite every element."""
    g = torch.Generator().manual_seed(4)
    a_t = torch.randn(3, 100, generator=g).to(DEVICE).requires_grad_()
    b_t = torch.randn(3, 100, generator=g).to(DEVICE).requires_grad_()
    grad_s = torch.randn(3, generator=g).to(DEVICE)
    clean = FastMasker(10, 40, seed=3, backend="triton").to(DEVICE)
    m, s = clean.sample_score(a_t, b_t)
    ga, gb = torch.autograd.grad((s * grad_s).sum(), [a_t, b_t])
    monkeypatch.setattr(op, "_empty", _poisoned_empty)
    poisoned = FastMasker(10, 40, seed=3, backend="triton").to(DEVICE)
    pm, ps = poisoned.sample_score(a_t, b_t)
    pga, pgb = torch.autograd.grad((ps * grad_s).sum(), [a_t, b_t])
    for got, want in ((pm, m), (ps, s), (pga, ga), (pgb, gb)):
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_kernel_writes_inside_its_outputs_only():
    """Outputs as views into larger NaN buffers: results equal, the guard elements untouched."""
    g = torch.Generator().manual_seed(5)
    rows, n = 3, 300
    a_t = torch.randn(rows, n, generator=g).to(DEVICE)
    b_t = torch.randn(rows, n, generator=g).to(DEVICE)
    state = torch.tensor([8, 3], device=DEVICE)
    flag = torch.zeros((), dtype=torch.bool, device=DEVICE)
    plain = tuple(torch.empty(rows, n, device=DEVICE) for _ in range(4)) + (torch.empty(rows, device=DEVICE),)
    op.launch_sample_score(a_t, b_t, state, flag, plain)
    bigs = [torch.full(((rows + 2) * n,), float("nan"), device=DEVICE) for _ in range(4)]
    big_s = torch.full((rows + 2,), float("nan"), device=DEVICE)
    views = tuple(b[n:-n].view(rows, n) for b in bigs) + (big_s[1:-1],)
    op.launch_sample_score(a_t, b_t, state, flag, views)
    for got, want in zip(views, plain):
        assert torch.equal(got, want)
    for b in bigs:
        assert torch.isnan(b[:n]).all() and torch.isnan(b[-n:]).all()
    assert torch.isnan(big_s[0]) and torch.isnan(big_s[-1])
    assert not flag.item()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 100.0])
def test_nonfinite_input_sets_the_device_flag(backend, value):
    """NaN or inf in a~ (or alpha = exp(100) overflowing) sets the flag, raises nothing, and no
    later finite step clears it; the rows without the bad value keep finite scores."""
    masker = FastMasker(4, 16, seed=1, backend=backend).to(DEVICE)
    g = torch.Generator().manual_seed(6)
    a_t = torch.randn(3, 16, generator=g).to(DEVICE)
    b_t = torch.randn(3, 16, generator=g).to(DEVICE)
    masker.sample_score(a_t, b_t)
    assert not masker.nonfinite.item()
    bad = a_t.clone()
    bad[1, 7] = value
    _, s = masker.sample_score(bad, b_t)
    assert masker.nonfinite.device.type == DEVICE and masker.nonfinite.item()
    assert torch.isfinite(s[[0, 2]]).all()
    masker.sample_score(a_t, b_t)
    assert masker.nonfinite.item()


@pytest.mark.parametrize("case,message", [
    ("shape", r"must both be \(B, 64\)"), ("mismatch", r"must both be"), ("int", "floating point"),
    ("dtypes", "same dtype"), ("device", "masker is on"), ("1d", r"must both be")])
def test_bad_input_is_refused_before_launch(case, message):
    masker = FastMasker(8, 32, backend="triton").to(DEVICE)
    a_t = torch.randn(2, 64, device=DEVICE)
    b_t = {"shape": torch.randn(2, 63), "mismatch": torch.randn(3, 64), "int": torch.randn(2, 64),
           "dtypes": torch.randn(2, 64).bfloat16(), "device": torch.randn(2, 64),
           "1d": torch.randn(64)}[case].to(DEVICE)
    if case == "int":
        a_t, b_t = a_t.long(), b_t.long()
    if case == "device":
        b_t = b_t.to("meta")
    if case == "1d":
        a_t = a_t[0]
    with pytest.raises(ValueError, match=message):
        masker.sample_score(a_t, b_t)
    assert masker.rng_state.tolist()[1] == 0  # nothing ran


def test_grid_larger_than_crop_is_refused():
    with pytest.raises(ValueError, match="grid 65 is larger than the crop size 64x64"):
        FastMasker(65, 64)
    with pytest.raises(ValueError, match="larger than the crop size 64x32"):
        FastMasker(40, (64, 32))


@pytest.mark.slow
@pytest.mark.parametrize("launch", [{"block": 1024}, {"block": 256, "num_warps": 4}], ids=["gpu-default", "b256"])
def test_the_compiled_block_walk_equals_one_block_per_row(monkeypatch, launch):
    """On a GPU each row is walked in blocks (an online logsumexp carried across them, and the
    backward over several programs per row); the interpreter otherwise takes a whole row in one
    block. Here the interpreter walks the blocks a GPU does: the masks, S and the gradients equal
    the one-block run (m exactly: a cell's random stream does not depend on the block)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    a_t = (torch.rand(ROWS, GRID * GRID, generator=g) * 6 - 3).to(DEVICE)
    b_t = (torch.rand(ROWS, GRID * GRID, generator=g) * 6 - 3).to(DEVICE)
    grad_s = torch.randn(ROWS, generator=g).to(DEVICE)

    def run():
        masker = FastMasker(GRID, 224, seed=21, backend="triton").to(DEVICE)
        masker.sample_launch = dict(launch)
        a, b = a_t.clone().requires_grad_(), b_t.clone().requires_grad_()
        m, s = masker.sample_score(a, b)
        ga, gb = torch.autograd.grad((s * grad_s).sum(), [a, b])
        return m, s, ga, gb

    one = run()
    if op.INTERPRET:  # a GPU walks the blocks already: both runs below do
        monkeypatch.setattr(op, "INTERPRET", False)
    assert op._block(GRID * GRID, launch["block"]) == launch["block"] < GRID * GRID
    walked = run()
    assert torch.equal(walked[0], one[0])
    for got, want in zip(walked[1:], one[1:]):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
