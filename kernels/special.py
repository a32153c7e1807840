"""Special functions for the Triton kernels, written with plain ``tl`` arithmetic only.

``lgamma``, ``digamma`` and ``log1p`` are not portable across Triton builds (they live in the CUDA
libdevice extra, which the interpreter does not run), so they are built here from ``log``, ``exp``
and rational terms: a fixed upward shift by 4 for small arguments (a product or a sum over 4
terms, selected branch-free with ``tl.where``), then the asymptotic series; its truncation error at
z >= 4 is below 1e-8 (first omitted terms 1/(1188 z^9) and 1/(132 z^10)), under float32 rounding.
Measured against scipy in float32 (tests/kernels/test_special.py): lgamma within 8 eps of
|lgamma x| + |x log x| + 1, digamma within 4 eps of |psi x| + 1/x. Valid for x > 0 (alpha, beta and their sum).
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only: elsewhere the kernels are defined, never launched
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = None


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small |x| (x > -1): the rounding of 1 + x is corrected by
    x / ((1 + x) - 1) (Goldberg's trick); exact 0 when 1 + x rounds to 1."""
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(u) * (x / safe_d))


@triton.jit
def lgamma_pos(x):
    """log Gamma(x) for x > 0 (float32)."""
    small = x < 4.0
    z = tl.where(small, x + 4.0, x)
    # log prod_{k<4} (x + k): no overflow for x < 4
    shift = tl.where(small, tl.log((x * (x + 1.0)) * ((x + 2.0) * (x + 3.0))), 0.0)
    zi = 1.0 / z
    zi2 = zi * zi
    series = zi * (0.08333333333333333 - zi2 * (0.002777777777777778
                                                 - zi2 * (0.0007936507936507937 - zi2 * 0.0005952380952380953)))
    return (z - 0.5) * tl.log(z) - z + 0.9189385332046727 + series - shift


@triton.jit
def digamma_pos(x):
    """psi(x) = d/dx log Gamma(x) for x > 0 (float32)."""
    small = x < 4.0
    z = tl.where(small, x + 4.0, x)
    shift = tl.where(small, (1.0 / x + 1.0 / (x + 1.0)) + (1.0 / (x + 2.0) + 1.0 / (x + 3.0)), 0.0)
    zi = 1.0 / z
    zi2 = zi * zi
    series = zi2 * (0.08333333333333333 - zi2 * (0.008333333333333333
                                                  - zi2 * (0.003968253968253968 - zi2 * 0.004166666666666667)))
    return tl.log(z) - 0.5 * zi - series - shift


@triton.jit
def cast_for_store(x, ptr):
    """float32 x in the element type of ``ptr``, rounded to nearest even.

    bfloat16 is rounded here with integer arithmetic (the result is exactly representable, so the
    final conversion is exact): the Triton interpreter truncates float32 -> bfloat16, while
    compiled code and torch round to nearest even; this way all three agree."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)
