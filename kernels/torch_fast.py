"""The mask step in plain torch, with the kernels' math: the fast path on the CPU.

Same algorithm as :mod:`.beta_mask` and :mod:`.mask_apply` (log-space Marsaglia-Tsang Gammas with
at most ``ROUNDS`` proposal rounds and the alpha < 1 boost, m formed from log G_a - log G_b and
clamped to [float32 tiny, 1 - 2^-24], log p scored on the returned m, the score terms sa and sb
saved for the backward; the mask as the banded matrix product ``A_h @ m @ A_w^T`` times the
image). Differences, all invisible in distribution:

- random numbers come from a ``torch.Generator`` seeded from (seed, step) (splitmix64), not from
  Philox: the CPU path and the Triton kernel draw different masks for the same state;
- after the first round only the still-rejected cells draw again (on the CPU that saves the work
  of the 7 rounds the kernel evaluates branch-free);
- lgamma is torch's own; digamma is the kernels' series (torch's CPU digamma is slow).

Reading ``step`` with ``tolist()`` is free on the CPU; on a GPU it would be a host sync, which is
why CUDA uses the Triton kernel.
"""
from __future__ import annotations

import torch

ROUNDS = 8
TINY = float(torch.finfo(torch.float32).tiny)
ONE_MINUS = 1.0 - 2.0 ** -24  # largest float32 below 1
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generator_for(state: torch.Tensor) -> torch.Generator:
    """A generator for one call, from the state tensor [seed, step] (read on the host)."""
    seed, step = (int(v) for v in state.tolist())
    gen = torch.Generator(device=state.device)
    gen.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1)
    return gen


def _uniform_open(shape, gen, device):
    """Uniform on (0, 1]: log() stays finite."""
    return 1.0 - torch.rand(shape, generator=gen, device=device)


def _proposal(x, u, d, c, log_d):
    """One Marsaglia-Tsang proposal per element: (log of d (1 + c x)^3, accepted?)."""
    y = c * x
    ok = y > -1
    y = y.masked_fill_(~ok, 0.0)  # rejected anyway where y <= -1; keeps log1p finite
    t = torch.log1p(y)
    thr = 0.5 * x * x + d * (3.0 * t - y * (3.0 + y * (3.0 + y)))
    return log_d + 3.0 * t, ok & (u.log_() < thr)


def log_gamma_sample(k: torch.Tensor, gen: torch.Generator, rounds: int = ROUNDS) -> torch.Tensor:
    """log G, G ~ Gamma(k, 1) per element of the flat float32 tensor k: Marsaglia-Tsang in log
    space, the alpha < 1 boost, at most ``rounds`` proposals (only rejected cells draw again)."""
    n, dev = k.numel(), k.device
    boost = k < 1
    d = k + boost.to(k.dtype) - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    log_d = d.log()
    cand, acc = _proposal(torch.randn(n, generator=gen, device=dev), _uniform_open(n, gen, dev), d, c, log_d)
    out = torch.where(acc, cand, log_d)  # log d: a cell whose proposals all fail (p < 3e-11)
    todo = (~acc).nonzero().squeeze(1)
    for _ in range(rounds - 1):
        if todo.numel() == 0:
            break
        cand, acc = _proposal(torch.randn(todo.numel(), generator=gen, device=dev),
                              _uniform_open(todo.numel(), gen, dev), d[todo], c[todo], log_d[todo])
        out[todo[acc]] = cand[acc]
        todo = todo[~acc]
    return out.addcmul_(_uniform_open(n, gen, dev).log_().div_(k), boost)


def digamma(x: torch.Tensor) -> torch.Tensor:
    """psi(x), x > 0, float32: the series of :func:`.special.digamma_pos` (torch's CPU digamma is
    several times slower)."""
    small = x < 4.0
    z = torch.where(small, x + 4.0, x)
    shift = (1.0 / x + 1.0 / (x + 1.0) + 1.0 / (x + 2.0) + 1.0 / (x + 3.0)).mul_(small)
    zi2 = (1.0 / z) ** 2
    series = zi2 * (1.0 / 12 - zi2 * (1.0 / 120 - zi2 * (1.0 / 252 - zi2 / 240)))
    return z.log() - 0.5 / z - series - shift


def sample_score(a_tilde: torch.Tensor, b_tilde: torch.Tensor, state: torch.Tensor, flag: torch.Tensor):
    """(m, logp, sa, sb, S) as the Triton kernel returns them, and the flag set as it sets it."""
    with torch.autocast(a_tilde.device.type, enabled=False):
        a = a_tilde.float()
        b = b_tilde.float()
        params = torch.stack([a, b]).exp_()  # alpha, beta
        alpha, beta = params[0], params[1]
        lg = log_gamma_sample(params.view(-1), generator_for(state)).view_as(params)
        ad = (lg[0] - lg[1]).abs_()
        small = torch.exp(-ad - torch.log1p(torch.exp(-ad)))  # the smaller of m and 1 - m
        m = torch.where(lg[0] > lg[1], 1.0 - small, small).clamp_(TINY, ONE_MINUS)
        log_m, log_1m = m.log(), torch.log1p(-m)
        args = torch.cat([params, (alpha + beta).unsqueeze(0)])  # alpha, beta, alpha + beta
        lgam, psi = torch.lgamma(args), digamma(args)
        logp = (alpha - 1) * log_m + (beta - 1) * log_1m - lgam[0] - lgam[1] + lgam[2]
        sa = alpha * (log_m - psi[0] + psi[2])
        sb = beta * (log_1m - psi[1] + psi[2])
        s = torch.logsumexp(logp, dim=1)
        bad = ~(torch.isfinite(a).all() & torch.isfinite(b).all() & torch.isfinite(s).all())
        flag.logical_or_(bad)
        return m, logp, sa, sb, s


def score_backward(grad_s, s, logp, sa, sb, dtype_a, dtype_b):
    w = grad_s.float().unsqueeze(1) * torch.exp(logp - s.unsqueeze(1))
    return (w * sa).to(dtype_a), (w * sb).to(dtype_b)


def apply(images: torch.Tensor, m: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """images * (A_h @ m @ A_w^T), broadcast over channels, float32 math, the images' dtype and layout."""
    grid = a_h.shape[1]
    with torch.autocast(images.device.type, enabled=False):
        mask = torch.matmul(torch.matmul(a_h, m.view(-1, grid, grid)), a_w.t()).unsqueeze(1)
        out = torch.empty_like(images)  # keeps channels-last; bf16 * float32 is computed in float32
        return torch.mul(images, mask, out=out)
