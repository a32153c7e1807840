"""The fused apply (Triton, and the torch CPU path) against upsample + blur + multiply.

Bounds (pgnm_fast.kernels.checks): against float64 ``x * (A m A^T)``, 32 eps32 |x| mask plus the output
dtype's rounding (half an ulp); against the reference's float32 upsample + blur + multiply, twice
that plus the reference's own float32 rounding.
"""

import pytest
import torch

from pgnm_fast.kernels import FastMasker
from pgnm_fast.kernels import masker as masker_mod
from pgnm_fast.kernels import reference as ref
from pgnm_fast.kernels.checks import C_APPLY, EPS32, error_summary, rounding_bound
from pgnm_fast.kernels.mask_plan import axis_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton),
            "torch"]


@pytest.mark.parametrize("grid,size,tile", [(64, 224, 32), (64, 224, 64), (64, 64, 32), (7, 33, 32),
                                            (1, 16, 32), (16, 17, 16), (3, 300, 32), (12, 80, 32)])
def test_band_plan_holds_every_nonzero_of_A(grid, size, tile):
    plan = axis_plan(grid, size, tile)
    a = ref.upsample_blur_matrix(grid, size)
    assert plan.width >= 16 and plan.width & (plan.width - 1) == 0 and plan.matrix.equal(a)
    rebuilt = torch.zeros_like(a)
    for t, start in enumerate(plan.starts.tolist()):
        rows = slice(t * tile, (t + 1) * tile)
        cols = slice(start, min(start + plan.width, grid))
        rebuilt[rows, cols] = a[rows, cols]
    assert torch.equal(rebuilt, a)
    if (grid, size) == (64, 224):
        assert plan.width == (16 if tile == 32 else 32)  # the band really is narrow


CASES = [(64, 224, 3, torch.float32, False), (64, 224, 1, torch.bfloat16, False),
         (16, 64, 3, torch.bfloat16, True), (8, 40, 3, torch.float32, True),
         (7, 33, 1, torch.float32, False), (12, (48, 80), 3, torch.float16, False),
         (16, 64, 4, torch.float32, True)]


def _bounds(x, m, grid, height, width):
    a_h = ref.upsample_blur_matrix(grid, height, dtype=torch.float64)
    a_w = ref.upsample_blur_matrix(grid, width, dtype=torch.float64)
    xd = x.double().cpu()
    mask = ref.mask_image_matrix(m.double().cpu(), a_h, a_w)
    exact = xd * mask
    bound = C_APPLY * EPS32 * xd.abs() * mask + rounding_bound(x.dtype, exact) + 1e-30
    return exact, bound, 2 * bound + 2 * C_APPLY * EPS32 * xd.abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,crop,channels,dtype,channels_last", CASES)
def test_apply_matches_exact_mask_and_reference(backend, grid, crop, channels, dtype, channels_last):
    height, width = (crop, crop) if isinstance(crop, int) else crop
    g = torch.Generator().manual_seed(grid * 7 + channels)
    x = torch.randn(3, channels, height, width, generator=g).to(DEVICE, dtype)  # B = 3: odd, ends a group
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    m = torch.rand(3, grid * grid, generator=g).to(DEVICE)
    y = FastMasker(grid, crop, backend=backend).to(DEVICE).apply(x, m)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=fmt)
    exact, bound, bound_ref = _bounds(x, m, grid, height, width)
    err = error_summary(y.cpu(), exact, bound, rel_floor=1.0)
    assert err["finite"] and err["norm"] <= 1.0, err
    err_ref = error_summary(y.cpu(), ref.mask_apply(x, m).double().cpu(), bound_ref, rel_floor=1.0)
    assert err_ref["norm"] <= 1.0, err_ref
    # the bound has teeth: a mask shifted by one pixel row fails it
    shifted = exact.roll(1, dims=2)
    assert error_summary(y.cpu(), shifted, bound, rel_floor=1.0)["norm"] > 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_accepts_strided_views_and_writes_every_output(backend, monkeypatch):
    """A non-contiguous input (a crop of a larger batch) and NaN-poisoned output buffers."""
    monkeypatch.setattr(masker_mod, "_empty_like", lambda t: torch.full_like(t, float("nan")))
    g = torch.Generator().manual_seed(3)
    big = torch.randn(4, 3, 40, 50, generator=g).to(DEVICE)
    x = big[1:3, :, 2:34, 5:37]  # (2, 3, 32, 32), strides of the big tensor
    m = torch.rand(2, 64, generator=g).to(DEVICE)
    y = FastMasker(8, 32, backend=backend).to(DEVICE).apply(x, m)
    exact, bound, _ = _bounds(x, m, 8, 32, 32)
    assert error_summary(y.cpu(), exact, bound)["norm"] <= 1.0


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_apply_kernel_writes_inside_its_output_only(channels_last):
    from pgnm_fast.kernels import mask_apply
    g = torch.Generator().manual_seed(8)
    masker = FastMasker(8, 40, backend="triton").to(DEVICE)
    x = torch.randn(3, 3, 40, 40, generator=g).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    m = torch.rand(3, 64, generator=g).to(DEVICE)
    want = masker.apply(x, m)
    big = torch.full((5, 3, 40, 40), float("nan"), device=DEVICE)
    if channels_last:
        big = big.to(memory_format=torch.channels_last)
    out = big[1:4]
    mask_apply.launch_mask_apply(x, out, m, masker.plan_h, masker.plan_w, masker.starts_h, masker.starts_w,
                     masker.a_h, masker.a_w)
    assert torch.equal(out, want)
    assert torch.isnan(big[0]).all() and torch.isnan(big[4]).all()


@pytest.mark.parametrize("case,message", [
    ("crop", r"must be \(B, C, 32, 32\)"), ("3d", r"must be \(B, C, 32, 32\)"),
    ("int", "must be float32, bfloat16 or float16"), ("m_shape", r"must be float32 \(B, 64\)"),
    ("m_batch", "with B = 2"), ("m_dtype", r"must be float32"), ("device", "masker is on")])
def test_apply_refuses_bad_input_before_launch(case, message):
    masker = FastMasker(8, 32, backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    m = torch.rand(2, 64, device=DEVICE)
    if case == "crop":
        x = torch.randn(2, 3, 32, 31, device=DEVICE)
    elif case == "3d":
        x = x[0]
    elif case == "int":
        x = x.long()
    elif case == "m_shape":
        m = torch.rand(2, 63, device=DEVICE)
    elif case == "m_batch":
        m = torch.rand(3, 64, device=DEVICE)
    elif case == "m_dtype":
        m = m.double()
    elif case == "device":
        x = x.to("meta")
    with pytest.raises(ValueError, match=message):
        masker.apply(x, m)
