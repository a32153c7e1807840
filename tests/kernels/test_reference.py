"""The pure-PyTorch mask step against independent computations (scipy, closed forms, the matrix form)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from pgnm_fast.kernels import reference as ref


@pytest.mark.parametrize("grid,size", [(64, 224), (16, 64), (8, 40), (7, 33)])
def test_matrix_form_equals_upsample_blur(grid, size):
    g = torch.Generator().manual_seed(grid * 1000 + size)
    m = torch.rand(3, grid * grid, generator=g)
    direct = ref.mask_image(m, size)
    a = ref.upsample_blur_matrix(grid, size)
    matrix = ref.mask_image_matrix(m, a)
    assert direct.shape == matrix.shape == (3, 1, size, size)
    torch.testing.assert_close(matrix, direct, rtol=0, atol=2e-6)  # float32 rounding of values in [0, 1]


def test_matrix_form_rectangular_crop():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(2, 16 * 16, generator=g)
    direct = ref.mask_image(m, (48, 80))
    matrix = ref.mask_image_matrix(m, ref.upsample_blur_matrix(16, 48), ref.upsample_blur_matrix(16, 80))
    torch.testing.assert_close(matrix, direct, rtol=0, atol=2e-6)


def test_blur_matches_explicit_torchvision_semantics():
    """Reflect-padded blur: rows of A sum to 1 and the kernel is torchvision's."""
    k = ref.gaussian_kernel1d(13, 6.0, dtype=torch.float64)
    x = torch.arange(-6, 7, dtype=torch.float64)
    expected = torch.exp(-0.5 * (x / 6.0) ** 2)
    torch.testing.assert_close(k, expected / expected.sum())
    a = ref.upsample_blur_matrix(64, 224, dtype=torch.float64)
    torch.testing.assert_close(a.sum(1), torch.ones(224, dtype=torch.float64))
    # One grid cell at a corner: reflection folds weight back inside, so column 0 gets the
    # kernel mass of offsets -6..+6 mirrored about pixel 0 (pixels -1..-6 reflect to 1..6).
    up = F.interpolate(torch.arange(64.).view(1, 1, 64), size=224, mode="nearest").view(-1).long()
    row0 = sum(float(k[t]) for t in range(13) if up[abs(t - 6)] == 0)
    assert a[0, 0].item() == pytest.approx(row0, abs=1e-12)


def test_mask_apply_broadcasts_over_channels_and_keeps_dtype():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g)
    m = torch.rand(2, 8 * 8, generator=g)
    out = ref.mask_apply(x, m)
    mask = ref.mask_image(m, 32)
    torch.testing.assert_close(out, x * mask)
    assert ref.mask_apply(x.bfloat16(), m).dtype == torch.bfloat16


def test_beta_log_prob_matches_scipy():
    g = torch.Generator().manual_seed(3)
    alpha = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(-3, 4, generator=g))
    beta = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(-3, 4, generator=g))
    m = torch.empty(500, dtype=torch.float64).uniform_(1e-4, 1 - 1e-4, generator=g)
    ours = ref.beta_log_prob(m, alpha, beta).numpy()
    np.testing.assert_allclose(ours, stats.beta.logpdf(m.numpy(), alpha.numpy(), beta.numpy()),
                               rtol=1e-9, atol=1e-9)


def naive_logsumexp(x, dim=-1):
    return torch.log(torch.sum(torch.exp(x), dim=dim))


def test_stable_logsumexp_equals_naive_where_finite_and_stays_finite():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4096, generator=g) * 3
    torch.testing.assert_close(ref.stable_logsumexp(x, 1), naive_logsumexp(x, 1), rtol=1e-6, atol=1e-5)
    peaked = x + 100.0  # exp(100) overflows float32: the authors' form gives inf
    assert torch.isinf(naive_logsumexp(peaked, 1)).all()
    s = ref.stable_logsumexp(peaked, 1)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, ref.stable_logsumexp(x, 1) + 100.0, rtol=1e-6, atol=1e-4)
    # float64 ground truth for the shifted rows
    torch.testing.assert_close(s.double(), naive_logsumexp(x.double(), 1) + 100.0, rtol=1e-6, atol=1e-4)


def test_sample_and_score_gradients_match_closed_form():
    """docs/method.md §4: dS/da~ = alpha * w * (log m - psi(alpha) + psi(alpha+beta)), same for
    b~."""
    g = torch.Generator().manual_seed(5)
    a_t = torch.empty(4, 64).uniform_(-2, 3, generator=g).requires_grad_()
    b_t = torch.empty(4, 64).uniform_(-2, 3, generator=g).requires_grad_()
    torch.manual_seed(5)
    m, logp, S = ref.sample_and_score(a_t, b_t)
    assert not m.requires_grad and S.shape == (4,)
    S.sum().backward()
    alpha, beta = a_t.detach().double().exp(), b_t.detach().double().exp()
    md = m.double()
    lp = ref.beta_log_prob(md, alpha, beta)
    w = torch.softmax(lp, dim=1)
    psi = torch.special.digamma
    ga = alpha * w * (torch.log(md) - psi(alpha) + psi(alpha + beta))
    gb = beta * w * (torch.log1p(-md) - psi(beta) + psi(alpha + beta))
    torch.testing.assert_close(a_t.grad.double(), ga, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(b_t.grad.double(), gb, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(S.double(), torch.logsumexp(lp, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.7), (0.5, 3.0), (2.0, 5.0), (30.0, 8.0)])
def test_reference_sampler_follows_beta_cdf(alpha, beta):
    """One-sample KS at level 1e-3 against scipy's exact Beta CDF (n = 20000: a shift of the
    CDF by 0.015 is detected with power > 0.99).

    beta stays >= 0.3 here: for smaller beta a visible share of the mass lies within 1e-7 of 1,
    where float32 cannot represent it (torch clamps it to the largest float below 1); the kernel
    tests handle that range with a float32-aware CDF."""
    torch.manual_seed(int(alpha * 100 + beta))
    n = 20000
    a_t = torch.full((1, n), math.log(alpha))
    b_t = torch.full((1, n), math.log(beta))
    m, _, _ = ref.sample_and_score(a_t, b_t)
    assert stats.kstest(m[0].double().numpy(), stats.beta(alpha, beta).cdf).pvalue > 1e-3
    wrong = stats.kstest(m[0].double().numpy(), stats.beta(alpha * 1.3, beta).cdf)
    assert wrong.pvalue < 1e-3  # the same test rejects a wrong distribution


def test_masker_flags_nonfinite_parameters_without_raising():
    masker = ref.ReferenceMasker(grid=4, crop_size=16)
    a = torch.randn(2, 16)
    b = torch.randn(2, 16)
    masker.sample_score(a, b)
    assert not masker.nonfinite.item()
    a[1, 3] = float("nan")
    masker.sample_score(a, b)
    assert masker.nonfinite.item()
    with pytest.raises(ValueError, match="grid 32 is larger"):
        ref.ReferenceMasker(grid=32, crop_size=16)
