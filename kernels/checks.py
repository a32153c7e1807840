"""The checks of the fast mask step against the reference, on fresh random inputs: the statistics
and error bounds the kernel tests use, and the report of ``pgnm-fast validate``.

Checks, each with its stated threshold (all in the JSON):

1. Sampling, over a sweep of (alpha, beta) in {0.05, 0.2, 1, 5, 50}^2, n = rows x 4096 draws each:
   - two-sample KS, fast sampler vs ``torch.distributions.Beta`` (the reference);
   - one-sample KS of the fast sampler against the exact Beta CDF (scipy), float32-aware: the law
     compared is that of X rounded to float32 and clamped to [tiny, 1 - 2^-24] as torch clamps,
     on the window [tiny, 1 - 2^-22] (above it float32 holds only four values, and the sampler's
     last-ulp rounding there is not the exact rounding; censoring is stated, not hidden). The
     p-value is scipy's exact KS law for n draws, which is conservative for a censored, discrete law.
   Every p-value must exceed LEVEL / (number of KS tests) (Bonferroni: family-wise false alarm
   below LEVEL = 1%). The same tests must *reject* a deliberately wrong sampler (alpha and beta
   swapped) on the pairs where that changes the law: the ``power`` rows.
2. Scores on shared samples: log p, S and the gradients of sum_b g_b S_b (random g) from the fast
   path against float64 on the very samples it drew (``beta_log_prob`` and the docs/method.md §4
   closed form). Error bounds are float32 condition bounds, C eps x (sum of the magnitudes the
   float32 computation goes through, including the sensitivity to rounding alpha = exp(a~));
   ``norm`` = max error / bound must be <= 1. Plain max abs and relative errors are reported too.
3. Apply: the fast apply against float64 ``x * (A m A^T)`` (bound 32 eps |x| mask, plus the output
   dtype's rounding) and against the reference upsample + blur + multiply (float32, so its own
   rounding is added to the bound), for float32 / bfloat16, NCHW / channels-last, 1 / 3 channels,
   several grids and crops.
4. The non-finite flag: set by NaN or inf in a~, by alpha overflowing, not by finite input.
"""
from __future__ import annotations

import math
import secrets

import numpy as np
import torch

from . import reference as ref
from .masker import FastMasker

EPS32 = 2.0 ** -23
TINY32 = float(torch.finfo(torch.float32).tiny)
ONE_MINUS32 = 1.0 - 2.0 ** -24
KS_HIGH = 1.0 - 2.0 ** -22  # one-sample window: [tiny, KS_HIGH)
LEVEL = 0.01                # family-wise false-alarm level of the KS tests
C_SCORE = 32.0              # log p, S and gradient bounds: C_SCORE * eps32 * condition scale
C_APPLY = 32.0              # apply bound: C_APPLY * eps32 * |x| * mask (+ output rounding)
SWEEP = (0.05, 0.2, 1.0, 5.0, 50.0)
QUICK_SWEEP = (0.05, 1.0, 50.0)
# rounding to an output dtype: relative unit roundoff, and absolute floor (half the smallest
# subnormal: float16's range is narrower than float32's)
ROUNDING = {torch.float32: (2.0 ** -24, 2.0 ** -150), torch.bfloat16: (2.0 ** -8, 2.0 ** -134),
            torch.float16: (2.0 ** -11, 2.0 ** -25)}


def rounding_bound(dtype, values):
    unit, floor = ROUNDING[dtype]
    return unit * values.abs() + floor


# ----------------------------------------------------------------------------------- statistics
def ks_float32(samples, alpha: float, beta: float, low: float = TINY32, high: float = KS_HIGH):
    """One-sample KS of float32 ``samples`` against Beta(alpha, beta) rounded to float32 and clamped
    to [tiny, 1 - 2^-24], over the window [low, high). Returns (D, p-value).

    For a float32 value v the rounded law puts on v the mass between the midpoints to its float32
    neighbours (the clamps collect everything beyond them), so just at v the CDF is F(upper mid)
    and just below v it is F(lower mid); the sup over the window is attained at those points."""
    from scipy import stats  # lazily: every pgnm-fast command imports this module
    x = np.sort(np.asarray(samples, dtype=np.float32))
    n = x.size
    v = np.unique(x)
    dist = stats.beta(alpha, beta)
    up = np.nextafter(v, np.float32(np.inf))
    down = np.nextafter(v, np.float32(0))
    v64 = v.astype(np.float64)
    cdf_at = np.where(v >= np.float32(ONE_MINUS32), 1.0, dist.cdf((v64 + up) / 2))
    cdf_below = np.where(v <= np.float32(TINY32), 0.0, dist.cdf((v64 + down) / 2))
    ecdf_at = np.searchsorted(x, v, side="right") / n
    ecdf_below = np.searchsorted(x, v, side="left") / n
    keep = (v >= low) & (v < high)
    d = max(np.abs(ecdf_at - cdf_at)[keep].max(initial=0.0), np.abs(ecdf_below - cdf_below)[keep].max(initial=0.0))
    # between the last sample below `high` and `high` itself
    high32 = np.float32(high)
    below_high = np.searchsorted(x, high32, side="left") / n
    d = max(d, abs(below_high - dist.cdf((float(high32) + float(np.nextafter(high32, np.float32(0)))) / 2)))
    return float(d), float(stats.kstwo.sf(d, n))


def ks_two_sample(x, y):
    """Two-sample KS (D, p-value); p from the asymptotic law (scipy's exact one is slow at n ~ 1e4)."""
    from scipy import stats
    res = stats.ks_2samp(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), method="asymp")
    return float(res.statistic), float(res.pvalue)


# ------------------------------------------------------------------------------- score references
def score_reference(m, a_tilde, b_tilde, grad_s):
    """float64 log p, S and gradients of sum_b grad_s[b] S[b] on the samples m, with error bounds."""
    md = m.double()
    alpha, beta = a_tilde.double().exp(), b_tilde.double().exp()
    lgam, psi = torch.lgamma, torch.digamma
    tri = lambda x: torch.special.polygamma(1, x)  # noqa: E731
    log_m, log_1m = md.log(), torch.log1p(-md)
    logp = ref.beta_log_prob(md, alpha, beta)
    s = torch.logsumexp(logp, dim=1)
    w = torch.exp(logp - s[:, None])
    ga_unit = log_m - psi(alpha) + psi(alpha + beta)
    gb_unit = log_1m - psi(beta) + psi(alpha + beta)
    g = grad_s.double()[:, None]
    grad_a, grad_b = g * alpha * w * ga_unit, g * beta * w * gb_unit
    ab = alpha + beta
    scale = (1 + (alpha - 1).abs() * log_m.abs() + (beta - 1).abs() * log_1m.abs() + lgam(alpha).abs()
             + lgam(beta).abs() + lgam(ab).abs() + (alpha * psi(alpha)).abs() + (beta * psi(beta)).abs()
             + (ab * psi(ab)).abs())
    bound_logp = C_SCORE * EPS32 * scale
    n = logp.shape[1]
    bound_s = C_SCORE * EPS32 * ((w * (scale + logp.abs())).sum(1) + s.abs() + math.log(n))
    rel_w = bound_logp + bound_s[:, None]  # relative error of w = exp(logp - S)
    sens_ab = ab * tri(ab)

    def grad_bound(k, unit, log_x, psi_k, tri_k):
        cond = log_x.abs() + psi_k.abs() + psi(ab).abs() + k * tri_k + sens_ab + 1
        return g.abs() * k * w * (unit.abs() * rel_w + C_SCORE * EPS32 * cond) + 1e-35

    bounds = {"logp": bound_logp, "S": bound_s,
              "grad_a": grad_bound(alpha, ga_unit, log_m, psi(alpha), tri(alpha)),
              "grad_b": grad_bound(beta, gb_unit, log_1m, psi(beta), tri(beta))}
    return {"logp": logp, "S": s, "grad_a": grad_a, "grad_b": grad_b}, bounds


def error_summary(got, want, bound, rel_floor=None):
    """max abs error, max relative error (to max(|want|, rel_floor) elementwise, or normwise per
    row when rel_floor is None) and max error / bound."""
    err = (got.double() - want).abs()
    if rel_floor is None:
        denom = want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300) if want.dim() > 1 else want.abs().max()
    else:
        denom = want.abs().clamp_min(rel_floor)
    finite = bool(torch.isfinite(got).all())
    return {"max_abs": float(err.max()), "max_rel": float((err / denom).max()),
            "norm": float((err / bound).max()) if finite else float("inf"), "finite": finite}


# ----------------------------------------------------------------------------------- the checks
def _pairs(quick: bool):
    sweep = QUICK_SWEEP if quick else SWEEP
    return [(a, b) for a in sweep for b in sweep]


def check_sampling(device, backend, seed, quick):
    rows = 2 if quick else 4
    grid = 64
    masker = FastMasker(grid, 224, seed=seed, backend=backend).to(device)
    pairs = _pairs(quick)
    power_pairs = [(a, b) for a, b in pairs if a < b and (a, b) in {(0.05, 1.0), (0.2, 5.0), (1.0, 50.0), (1.0, 5.0)}]
    n_tests = 2 * len(pairs)
    level = LEVEL / n_tests
    results, power = [], []
    for alpha, beta in pairs:
        a_t = torch.full((rows, grid * grid), math.log(alpha), device=device)
        b_t = torch.full((rows, grid * grid), math.log(beta), device=device)
        m, _ = masker.sample_score(a_t, b_t)
        m_ref, _, _ = ref.sample_and_score(a_t, b_t)
        fast = m.flatten().cpu().numpy()
        d2, p2 = ks_two_sample(fast, m_ref.flatten().cpu().numpy())
        d1, p1 = ks_float32(fast, alpha, beta)
        d1r, p1r = ks_float32(m_ref.flatten().cpu().numpy(), alpha, beta)
        results.append({"alpha": alpha, "beta": beta, "n": int(fast.size),
                        "ks2_D": d2, "ks2_p": p2, "ks1_D": d1, "ks1_p": p1,
                        "reference_ks1_D": d1r, "reference_ks1_p": p1r,
                        "passed": bool(p2 > level and p1 > level)})
        if (alpha, beta) in power_pairs:  # the same tests on a wrong sampler: alpha and beta swapped
            m_bad, _ = masker.sample_score(b_t, a_t)
            bad = m_bad.flatten().cpu().numpy()
            d2b, p2b = ks_two_sample(bad, m_ref.flatten().cpu().numpy())
            d1b, p1b = ks_float32(bad, alpha, beta)
            power.append({"alpha": alpha, "beta": beta, "wrong": "alpha and beta swapped",
                          "ks2_D": d2b, "ks2_p": p2b, "ks1_D": d1b, "ks1_p": p1b,
                          "passed": bool(p2b < level and p1b < level)})
    return {"level_per_test": level, "family_level": LEVEL, "window": [TINY32, KS_HIGH],
            "pairs": results, "power": power,
            "passed": all(r["passed"] for r in results) and all(r["passed"] for r in power)}


def check_scores(device, backend, gen, quick):
    shapes = [(4, 64), (3, 16), (2, 7)] if not quick else [(2, 64), (2, 7)]
    lo, hi = math.log(0.05), math.log(50.0)
    out = []
    for (rows, grid) in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            masker = FastMasker(grid, max(grid, 16), seed=int(torch.randint(2 ** 31, (), generator=gen)),
                                backend=backend).to(device)
            a_t = (torch.rand(rows, grid * grid, generator=gen) * (hi - lo) + lo).to(device, dtype).requires_grad_()
            b_t = (torch.rand(rows, grid * grid, generator=gen) * (hi - lo) + lo).to(device, dtype).requires_grad_()
            grad_s = torch.randn(rows, generator=gen).to(device)
            state = masker.rng_state.clone()
            from .sample_score import sample_score_parts
            m, logp, _, _, s_parts = sample_score_parts(a_t.detach(), b_t.detach(), state, masker.nonfinite,
                                                        masker._use_triton(a_t.device))
            m2, s = masker.sample_score(a_t, b_t)  # same state: the same draw, through autograd
            (s * grad_s).sum().backward()
            want, bounds = score_reference(m.cpu(), a_t.detach().cpu(), b_t.detach().cpu(), grad_s.cpu())
            row = {"rows": rows, "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                   "same_draw": bool(torch.equal(m, m2) and torch.equal(s, s_parts)),
                   "logp": error_summary(logp.cpu(), want["logp"], bounds["logp"], rel_floor=1.0),
                   "S": error_summary(s.detach().cpu(), want["S"], bounds["S"], rel_floor=1.0),
                   "grad_a": error_summary(a_t.grad.float().cpu(), want["grad_a"], bounds["grad_a"]),
                   "grad_b": error_summary(b_t.grad.float().cpu(), want["grad_b"], bounds["grad_b"])}
            if dtype != torch.float32:  # gradients are returned in a~'s dtype: add its rounding
                for k in ("grad_a", "grad_b"):
                    extra = rounding_bound(dtype, want[k]) + bounds[k]
                    row[k] = error_summary((a_t if k == "grad_a" else b_t).grad.float().cpu(),
                                           want[k], extra)
            row["passed"] = row["same_draw"] and all(row[k]["norm"] <= 1.0 for k in ("logp", "S", "grad_a", "grad_b"))
            out.append(row)
    return {"C": C_SCORE, "bound": "C * eps32 * condition scale (see pgnm_fast.kernels.checks.score_reference)",
            "cases": out, "passed": all(r["passed"] for r in out)}


def check_apply(device, backend, gen, quick):
    cases = [(64, 224, 3, torch.float32, False), (64, 224, 1, torch.bfloat16, False),
             (64, 224, 3, torch.bfloat16, True), (16, 64, 3, torch.float32, True),
             (8, 40, 1, torch.float32, False), (7, 33, 3, torch.bfloat16, False),
             (12, (48, 80), 3, torch.float32, True)]
    if quick:
        cases = cases[1:3] + cases[4:]
    out = []
    for grid, crop, channels, dtype, channels_last in cases:
        height, width = (crop, crop) if isinstance(crop, int) else crop
        masker = FastMasker(grid, crop, backend=backend).to(device)
        x = torch.randn(2, channels, height, width, generator=gen).to(device, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        m = torch.rand(2, grid * grid, generator=gen).clamp_min(1e-6).to(device)
        y = masker.apply(x, m)
        a_h = ref.upsample_blur_matrix(grid, height, dtype=torch.float64)
        a_w = ref.upsample_blur_matrix(grid, width, dtype=torch.float64)
        xd = x.double().cpu()
        mask64 = ref.mask_image_matrix(m.double().cpu(), a_h, a_w)
        exact = xd * mask64
        y_ref = ref.mask_apply(x, m).double().cpu()
        bound = C_APPLY * EPS32 * xd.abs() * mask64 + rounding_bound(dtype, exact) + 1e-30
        bound_ref = 2 * bound + 2 * C_APPLY * EPS32 * xd.abs()  # the reference conv has its own rounding
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        layout_ok = y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(memory_format=fmt)
        row = {"grid": grid, "crop": [height, width], "channels": channels, "dtype": str(dtype).replace("torch.", ""),
               "channels_last": channels_last, "layout_kept": bool(layout_ok),
               "vs_exact": error_summary(y.cpu(), exact, bound, rel_floor=1.0),
               "vs_reference": error_summary(y.cpu(), y_ref, bound_ref, rel_floor=1.0)}
        row["passed"] = layout_ok and row["vs_exact"]["norm"] <= 1 and row["vs_reference"]["norm"] <= 1
        out.append(row)
    return {"C": C_APPLY, "cases": out, "passed": all(r["passed"] for r in out)}


def check_flags(device, backend, gen):
    masker = FastMasker(4, 16, backend=backend).to(device)
    a_t = torch.randn(3, 16, generator=gen).to(device)
    b_t = torch.randn(3, 16, generator=gen).to(device)
    masker.sample_score(a_t, b_t)
    clean = not bool(masker.nonfinite)
    results = {"finite_input_clear": clean}
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("alpha_overflow", 100.0)):
        mk = FastMasker(4, 16, backend=backend).to(device)
        bad = a_t.clone()
        bad[1, 5] = value
        mk.sample_score(bad, b_t)
        mk.sample_score(a_t, b_t)  # a later finite step must not clear it
        results[f"{name}_sets_flag"] = bool(mk.nonfinite)
    results["passed"] = all(results.values())
    return results


def run_validation(device: str = "cpu", seed: int | None = None, quick: bool = False,
                   backend: str = "auto") -> dict:
    """Run every check on ``device``; returns a dict with every number and ``"passed"``."""
    seed = secrets.randbits(31) if seed is None else int(seed)
    torch.manual_seed(seed)  # the reference sampler draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    masker = FastMasker(4, 16, backend=backend).to(device)
    result = {"device": str(device), "device_name": _device_name(device), "seed": seed, "quick": quick,
              "backend": "triton" if masker._use_triton(torch.device(device)) else "torch",
              "torch": torch.__version__, "triton": _triton_version()}
    result["sampling"] = check_sampling(device, backend, seed, quick)
    result["scores"] = check_scores(device, backend, gen, quick)
    result["apply"] = check_apply(device, backend, gen, quick)
    result["nonfinite_flag"] = check_flags(device, backend, gen)
    result["passed"] = all(result[k]["passed"] for k in ("sampling", "scores", "apply", "nonfinite_flag"))
    return result


def _device_name(device) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def format_table(result: dict) -> str:
    ok = lambda flag: "ok  " if flag else "FAIL"  # noqa: E731
    lines = [f"pgnm-fast validate: device {result['device']} ({result['device_name']}), backend "
             f"{result['backend']}, seed {result['seed']}"]
    smp = result["sampling"]
    lines.append(f"sampling: KS, reject below p = {smp['level_per_test']:.2e} per test "
                 f"(family level {smp['family_level']})")
    lines.append("  alpha   beta       n   KS2 D    KS2 p    KS1 D    KS1 p")
    for r in smp["pairs"]:
        lines.append(f"  {r['alpha']:<6g} {r['beta']:<6g} {r['n']:6d}  {r['ks2_D']:.4f}  {r['ks2_p']:.2e}  "
                     f"{r['ks1_D']:.4f}  {r['ks1_p']:.2e}  {ok(r['passed'])}")
    for r in smp["power"]:
        lines.append(f"  power, {r['wrong']} at ({r['alpha']:g}, {r['beta']:g}): KS2 p {r['ks2_p']:.1e}, "
                     f"KS1 p {r['ks1_p']:.1e}  {ok(r['passed'])} (must reject)")
    lines.append(f"scores on shared samples (norm = max error / bound, must be <= 1; C = {result['scores']['C']:g})")
    for r in result["scores"]["cases"]:
        parts = "  ".join(f"{k} abs {r[k]['max_abs']:.1e} rel {r[k]['max_rel']:.1e} norm {r[k]['norm']:.2f}"
                          for k in ("logp", "S", "grad_a", "grad_b"))
        lines.append(f"  B={r['rows']} G={r['grid']} {r['dtype']:<8} {parts}  {ok(r['passed'])}")
    lines.append(f"apply (norm vs exact float64 and vs reference upsample+blur; C = {result['apply']['C']:g})")
    for r in result["apply"]["cases"]:
        lines.append(f"  G={r['grid']:<3d} crop={r['crop'][0]}x{r['crop'][1]:<4d} C={r['channels']} {r['dtype']:<8} "
                     f"{'NHWC' if r['channels_last'] else 'NCHW'}  exact abs {r['vs_exact']['max_abs']:.1e} "
                     f"norm {r['vs_exact']['norm']:.2f}  ref abs {r['vs_reference']['max_abs']:.1e} "
                     f"norm {r['vs_reference']['norm']:.2f}  {ok(r['passed'])}")
    flags = {k: v for k, v in result["nonfinite_flag"].items() if k != "passed"}
    lines.append("non-finite flag: " + ", ".join(f"{k} {ok(v).strip()}" for k, v in flags.items()))
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines)
