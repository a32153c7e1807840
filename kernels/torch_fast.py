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
- lgamma and digamma are torch's own.

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


def log_gamma_sample(k: torch.Tensor, gen: torch.Generator, rounds: int = ROUNDS) -> torch.Tensor:
    """log G, G ~ Gamma(k, 1) per element of the float32 tensor k (flat), Marsaglia-Tsang in log space."""
    boost = k < 1
    kk = torch.where(boost, k + 1, k)
    d = kk - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    log_d = d.log()
    out = log_d.clone()  # value of a cell whose proposals are all rejected (probability < 3e-11)
    todo = torch.arange(k.numel(), device=k.device)
    for _ in range(rounds):
        x = torch.randn(todo.numel(), generator=gen, device=k.device)
        u = _uniform_open(todo.numel(), gen, k.device)
        dt, ct = d[todo], c[todo]
        y = ct * x
        ok = y > -1
        y = torch.where(ok, y, torch.zeros_like(y))
        t = torch.log1p(y)
        thr = 0.5 * x * x + dt * (3.0 * t - y * (3.0 + y * (3.0 + y)))
        acc = ok & (u.log() < thr)
        out[todo[acc]] = log_d[todo[acc]] + 3.0 * t[acc]
        todo = todo[~acc]
        if todo.numel() == 0:
            break
    u = _uniform_open(k.numel(), gen, k.device)
    return out + torch.where(boost, u.log() / k, torch.zeros_like(k))


def sample_score(a_tilde: torch.Tensor, b_tilde: torch.Tensor, state: torch.Tensor, flag: torch.Tensor):
    """(m, logp, sa, sb, S) as the Triton kernel returns them, and the flag set as it sets it."""
    with torch.autocast(a_tilde.device.type, enabled=False):
        a = a_tilde.float()
        b = b_tilde.float()
        alpha, beta = a.exp(), b.exp()
        gen = generator_for(state)
        lga = log_gamma_sample(alpha.reshape(-1), gen).view_as(alpha)
        lgb = log_gamma_sample(beta.reshape(-1), gen).view_as(beta)
        ad = (lga - lgb).abs()
        small = torch.exp(-ad - torch.log1p(torch.exp(-ad)))
        m = torch.where(lga > lgb, 1.0 - small, small).clamp_(TINY, ONE_MINUS)
        log_m, log_1m = m.log(), torch.log1p(-m)
        psi_ab = torch.digamma(alpha + beta)
        logp = ((alpha - 1) * log_m + (beta - 1) * log_1m
                - torch.lgamma(alpha) - torch.lgamma(beta) + torch.lgamma(alpha + beta))
        sa = alpha * (log_m - torch.digamma(alpha) + psi_ab)
        sb = beta * (log_1m - torch.digamma(beta) + psi_ab)
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
