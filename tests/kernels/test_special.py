"""lgamma, digamma and log1p of the Triton kernels (plain tl arithmetic) against scipy in float64."""
import numpy as np
import pytest
import torch
from scipy import special

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton  # tests/kernels/conftest.py
EPS = 2.0 ** -23

triton = pytest.importorskip("triton")  # the Triton code under test needs triton itself
tl = pytest.importorskip("triton.language")
from pgnm_fast.kernels.special import digamma_pos, lgamma_pos, log1p  # noqa: E402  (imports triton)


@triton.jit
def _special_kernel(x_ptr, y_ptr, lg_ptr, dg_ptr, l1_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    x = tl.load(x_ptr + i, mask=inside, other=1.0)
    y = tl.load(y_ptr + i, mask=inside, other=0.0)
    tl.store(lg_ptr + i, lgamma_pos(x), mask=inside)
    tl.store(dg_ptr + i, digamma_pos(x), mask=inside)
    tl.store(l1_ptr + i, log1p(y), mask=inside)


def _run(x, y):
    outs = [torch.full_like(x, float("nan")) for _ in range(3)]  # poisoned: every lane must be written
    n = x.numel()
    _special_kernel[(triton.cdiv(n, 2048),)](x, y, *outs, n, BLOCK=2048)
    return [o.double().cpu().numpy() for o in outs]


def test_lgamma_digamma_log1p_match_scipy():
    g = torch.Generator().manual_seed(20)
    # x over 1e-6 .. 1e6 (alpha, beta and their sum), plus the branch points and the zeros of lgamma
    x = torch.exp(torch.empty(6000).uniform_(np.log(1e-6), np.log(1e6), generator=g))
    x = torch.cat([x, torch.tensor([1.0, 2.0, 0.5, 3.999, 4.0, 4.001, 1.4616321, 1e-30]),
                   torch.empty(2000).uniform_(0.9, 2.1, generator=g)])
    y = torch.empty(x.numel()).uniform_(-0.999, 1.0, generator=g)
    y[:1000] = y[:1000] * 1e-6  # tiny arguments, where log(1 + y) loses everything
    lg, dg, l1 = _run(x.to(DEVICE), y.to(DEVICE))
    xd, yd = x.double().numpy(), y.double().numpy()
    ref_lg, ref_dg, ref_l1 = special.gammaln(xd), special.digamma(xd), np.log1p(yd)
    # measured: 6.5 eps and 3.4 eps (CPU interpreter); the bounds leave room for GPU libm
    assert np.all(np.abs(lg - ref_lg) <= 16 * EPS * (np.abs(ref_lg) + np.abs(xd * np.log(xd)) + 1))
    assert np.all(np.abs(dg - ref_dg) <= 8 * EPS * (np.abs(ref_dg) + 1 / xd))
    assert np.all(np.abs(l1 - ref_l1) <= 4 * EPS * np.abs(ref_l1))

