"""The PGNM sample + score op (docs/method.md §4): the Triton kernels and their launchers, the same
math in plain torch for the CPU, and the autograd function that joins them.

One program per image (row of B x G^2): it walks the row in blocks and, per cell,
- draws m ~ Beta(alpha, beta), alpha = exp(a~), beta = exp(b~), as G_a / (G_a + G_b) from the
  log-Gammas (no 0/0 when both Gammas underflow for small alpha and beta; the smaller of m and
  1 - m is formed directly, so m is within about an ulp of the exactly rounded ratio at both ends),
  each Gamma by Marsaglia-Tsang with ``ROUNDS`` proposal rounds and the alpha < 1 boost
  G(alpha) = G(alpha + 1) * U^(1/alpha); m is clamped to [float32 tiny, 1 - 2^-24] as torch does;
- scores the returned m: log p (float32, from m itself, as the reference does), the row's
  S = logsumexp (online, per lane), and the score terms the backward needs,
  sa = alpha (log m - psi(alpha) + psi(alpha + beta)), sb = beta (log(1 - m) - psi(beta) + psi(alpha + beta));
- sets the non-finite flag when a~ or b~ holds a NaN or inf, or the row's S is not finite (alpha
  or beta overflowing float32): a plain store of 1, racing writers all write the same value, and
  nothing ever clears it here.

Randomness is Triton's counter-based Philox (``tl.randint4x``): the key is the seed and the 64-bit
counter is ``step << 32 | cell * (ROUNDS + 1) + round``, with seed and step *loaded from a device
tensor*, so a captured CUDA graph that advances ``step`` on the device draws fresh masks on every
replay. One Philox call gives four 32-bit words per round: two uniforms for a Box-Muller pair
(the normals of both Gammas) and the two acceptance uniforms.

Rejection: at shape k >= 1 Marsaglia-Tsang rejects at most 4.83% of proposals (k = 1), so all
``ROUNDS = 8`` proposals fail with probability below 3e-11 per Gamma draw; such a cell keeps
d = k - 1/3 (next to the mode), a bias far below what any test can see.
"""
from __future__ import annotations

import os

import torch

from .special import cast_for_store, digamma_pos, lgamma_pos, log1p, tl, triton

ROUNDS = 8
TINY = float(torch.finfo(torch.float32).tiny)
ONE_MINUS = 1.0 - 2.0 ** -24  # largest float32 below 1
_MASK64 = (1 << 64) - 1
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _uniform(bits):
    """uint32 -> float32 (2k + 1) / 2^24 for k < 2^23: uniform on the open interval (0, 1)."""
    return (bits >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08


@triton.jit
def _mt_round(x, u, d, c, log_d, lg, done):
    """One Marsaglia-Tsang proposal d (1 + c x)^3 for every lane not yet accepted.

    Accept iff log u < x^2 / 2 + d (1 - v + log v), v = (1 + c x)^3, written as
    d (3 log1p(y) - y (3 + y (3 + y))) with y = c x to avoid the cancellation in 1 - v + log v."""
    y = c * x
    ok = y > -1.0
    ys = tl.where(ok, y, 0.0)
    t = log1p(ys)
    thr = 0.5 * x * x + d * (3.0 * t - ys * (3.0 + ys * (3.0 + ys)))
    acc = ok & (tl.log(u) < thr) & (done == 0)
    lg = tl.where(acc, log_d + 3.0 * t, lg)
    done = done | acc.to(tl.int32)
    return lg, done


@triton.jit
def _sample_score_kernel(a_ptr, b_ptr, state_ptr, m_ptr, logp_ptr, sa_ptr, sb_ptr, s_ptr, flag_ptr,
                              stride_ar, stride_ac, stride_br, stride_bc,
                              N: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(state_ptr)
    step = tl.load(state_ptr + 1)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    n_bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < N
        a = tl.load(a_ptr + row * stride_ar + cols * stride_ac, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_br + cols * stride_bc, mask=inside, other=0.0).to(tl.float32)
        n_bad += (((a - a) != 0.0) | ((b - b) != 0.0)).to(tl.int32)  # NaN or inf
        alpha = tl.exp(a)
        beta = tl.exp(b)
        # Marsaglia-Tsang for shapes boosted to >= 1
        ka = tl.where(alpha < 1.0, alpha + 1.0, alpha)
        kb = tl.where(beta < 1.0, beta + 1.0, beta)
        da = ka - 0.3333333333333333
        db = kb - 0.3333333333333333
        ca = 1.0 / tl.sqrt(9.0 * da)
        cb = 1.0 / tl.sqrt(9.0 * db)
        log_da = tl.log(da)
        log_db = tl.log(db)
        lga = log_da
        lgb = log_db
        done_a = tl.zeros([BLOCK], tl.int32)
        done_b = tl.zeros([BLOCK], tl.int32)
        counter = (step << 32) + (row * N + cols).to(tl.int64) * (ROUNDS + 1)
        for r in range(ROUNDS):
            i1, i2, i3, i4 = tl.randint4x(seed, counter + r)
            u1 = _uniform(i1)
            rad = tl.sqrt(-2.0 * tl.log(u1))
            th = 6.283185307179586 * _uniform(i2)
            lga, done_a = _mt_round(rad * tl.cos(th), _uniform(i3), da, ca, log_da, lga, done_a)
            lgb, done_b = _mt_round(rad * tl.sin(th), _uniform(i4), db, cb, log_db, lgb, done_b)
        j1, j2, _, _ = tl.randint4x(seed, counter + ROUNDS)
        lga += tl.where(alpha < 1.0, tl.log(_uniform(j1)) / alpha, 0.0)
        lgb += tl.where(beta < 1.0, tl.log(_uniform(j2)) / beta, 0.0)
        # m = G_a / (G_a + G_b) from d = log G_a - log G_b: the smaller of m and 1 - m is
        # exp(-|d| - log1p(exp(-|d|))), accurate near 0 and near 1; clamped as torch clamps
        ad = tl.abs(lga - lgb)
        small = tl.exp(-ad - log1p(tl.exp(-ad)))
        m = tl.where(lga > lgb, 1.0 - small, small)
        m = tl.minimum(tl.maximum(m, 1.1754943508222875e-38), 0.9999999403953552)
        log_m = tl.log(m)
        log_1m = log1p(-m)
        psi_ab = digamma_pos(alpha + beta)
        logp = ((alpha - 1.0) * log_m + (beta - 1.0) * log_1m
                - lgamma_pos(alpha) - lgamma_pos(beta) + lgamma_pos(alpha + beta))
        sa = alpha * (log_m - digamma_pos(alpha) + psi_ab)
        sb = beta * (log_1m - digamma_pos(beta) + psi_ab)
        out = row * N + cols
        tl.store(m_ptr + out, m, mask=inside)
        tl.store(logp_ptr + out, logp, mask=inside)
        tl.store(sa_ptr + out, sa, mask=inside)
        tl.store(sb_ptr + out, sb, mask=inside)
        # online logsumexp, lane by lane (masked lanes carry -inf and add nothing)
        x = tl.where(inside, logp, float("-inf"))
        new_max = tl.maximum(lane_max, x)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - ref) + tl.exp(x - ref)
        lane_max = new_max
    top = tl.max(lane_max, axis=0)
    top_ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(lane_sum * tl.exp(lane_max - top_ref), axis=0)
    s_row = top_ref + tl.log(total)
    tl.store(s_ptr + row, s_row)
    # non-finite input, or a finite input whose alpha or beta overflows (S not finite)
    bad = (tl.sum(n_bad, axis=0) > 0) | ((s_row - s_row) != 0.0)
    tl.store(flag_ptr, 1, mask=bad)

@triton.jit
def _score_backward_kernel(gs_ptr, s_ptr, logp_ptr, sa_ptr, sb_ptr, ga_ptr, gb_ptr, N, stride_gs,
                           BLOCK: tl.constexpr):
    """dS/da~ = gS * w * sa and dS/db~ = gS * w * sb with w = exp(log p - S) (docs/method.md §4)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < N
    g = tl.load(gs_ptr + row * stride_gs).to(tl.float32)
    s = tl.load(s_ptr + row)
    offs = row * N + cols
    w = g * tl.exp(tl.load(logp_ptr + offs, mask=inside, other=0.0) - s)
    ga = w * tl.load(sa_ptr + offs, mask=inside, other=0.0)
    gb = w * tl.load(sb_ptr + offs, mask=inside, other=0.0)
    tl.store(ga_ptr + offs, cast_for_store(ga, ga_ptr), mask=inside)
    tl.store(gb_ptr + offs, cast_for_store(gb, gb_ptr), mask=inside)


# Launch settings for compiled runs, chosen without a GPU at hand from ptxas on sm_90 (N = 4096,
# BLOCK 1024 / 16 warps: 103 registers, no spills, 2 cells per thread); bench/bench_kernels.py
# sweeps others on a GPU and records which is fastest.
BLOCK = 1024
NUM_WARPS = 16


def _block(n: int, block: int | None) -> int:
    # The interpreter's cost is per operation, not per element: give it whole rows.
    return min(triton.next_power_of_2(n), 4096 if INTERPRET else (block or BLOCK))


def launch_sample_score(a_tilde, b_tilde, state, flag, out, block: int | None = None, num_warps: int | None = None):
    """Launch the sample + score kernel. ``out`` = (m, logp, sa, sb, S), float32, contiguous,
    written entirely by the kernel; ``state`` int64 [seed, step] is read (not advanced) here;
    ``flag`` is a bool tensor (set to True on non-finite input or S, never cleared)."""
    m, logp, sa, sb, s = out
    rows, n = a_tilde.shape
    _sample_score_kernel[(rows,)](
        a_tilde, b_tilde, state, m, logp, sa, sb, s, flag.view(torch.uint8),
        a_tilde.stride(0), a_tilde.stride(1), b_tilde.stride(0), b_tilde.stride(1),
        N=n, ROUNDS=ROUNDS, BLOCK=_block(n, block), num_warps=num_warps or NUM_WARPS)


def launch_score_backward(grad_s, s, logp, sa, sb, grad_a, grad_b):
    """Launch the backward kernel: writes grad_a and grad_b (contiguous, any float dtype)."""
    rows, n = logp.shape
    block = _block(n, 1024)
    _score_backward_kernel[(rows, triton.cdiv(n, block))](
        grad_s, s, logp, sa, sb, grad_a, grad_b, n, grad_s.stride(0), BLOCK=block, num_warps=4)


# ----------------------------------------------------------------------- the CPU path, plain torch
# The kernel's algorithm in plain torch (log-space Marsaglia-Tsang Gammas with
# at most ``ROUNDS`` proposal rounds and the alpha < 1 boost, m formed from log G_a - log G_b and
# clamped to [float32 tiny, 1 - 2^-24], log p scored on the returned m, the score terms sa and sb
# saved for the backward). Differences, all invisible in distribution:
#
# - random numbers come from a ``torch.Generator`` seeded from (seed, step) (splitmix64), not from
#   Philox: the CPU path and the Triton kernel draw different masks for the same state;
# - after the first round only the still-rejected cells draw again (on the CPU that saves the work
#   of the 7 rounds the kernel evaluates branch-free);
# - lgamma is torch's own; digamma is the kernels' series (torch's CPU digamma is slow).
#
# Reading ``step`` with ``tolist()`` is free on the CPU; on a GPU it would be a host sync, which is
# why CUDA uses the Triton kernel.
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


def sample_score_torch(a_tilde: torch.Tensor, b_tilde: torch.Tensor, state: torch.Tensor, flag: torch.Tensor):
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


def score_backward_torch(grad_s, s, logp, sa, sb, dtype_a, dtype_b):
    w = grad_s.float().unsqueeze(1) * torch.exp(logp - s.unsqueeze(1))
    return (w * sa).to(dtype_a), (w * sb).to(dtype_b)


# ------------------------------------------------------------------------------ the autograd glue
def _empty(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Every output buffer of the Triton path comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def sample_score_parts(a_tilde, b_tilde, state, flag, use_triton: bool, launch: dict | None = None):
    """The forward of the sample + score step: (m, logp, sa, sb, S), all float32, no autograd.

    Reads ``state`` [seed, step] without advancing it; sets ``flag`` on non-finite input or S."""
    if not use_triton:
        return sample_score_torch(a_tilde, b_tilde, state, flag)
    rows, n = a_tilde.shape
    dev = a_tilde.device
    out = tuple(_empty((rows, n), device=dev) for _ in range(4)) + (_empty((rows,), device=dev),)
    launch_sample_score(a_tilde, b_tilde, state, flag, out, **(launch or {}))
    return out


class SampleScore(torch.autograd.Function):
    """(m, S) from (a~, b~); gradients reach a~ and b~ through S only."""

    @staticmethod
    def forward(ctx, a_tilde, b_tilde, state, flag, use_triton, launch):
        m, logp, sa, sb, s = sample_score_parts(a_tilde, b_tilde, state, flag, use_triton, launch)
        ctx.save_for_backward(s, logp, sa, sb)
        ctx.dtypes = (a_tilde.dtype, b_tilde.dtype)
        ctx.use_triton = use_triton
        ctx.mark_non_differentiable(m)
        return m, s

    @staticmethod
    def backward(ctx, grad_m, grad_s):
        s, logp, sa, sb = ctx.saved_tensors
        if ctx.use_triton:
            grad_a = _empty(logp.shape, ctx.dtypes[0], logp.device)
            grad_b = _empty(logp.shape, ctx.dtypes[1], logp.device)
            launch_score_backward(grad_s, s, logp, sa, sb, grad_a, grad_b)
        else:
            grad_a, grad_b = score_backward_torch(grad_s, s, logp, sa, sb, *ctx.dtypes)
        return grad_a, grad_b, None, None, None, None
