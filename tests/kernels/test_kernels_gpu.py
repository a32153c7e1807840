"""GPU-only properties of the fast mask step: CUDA-graph replay, no host sync, stable allocation,
the authors' shapes. (Every other kernel test also runs on the GPU, compiled, when one is present.)"""
import math

import pytest
import torch

from pgnm_fast.kernels import FastMasker
from pgnm_fast.kernels.checks import C_APPLY, EPS32, error_summary, ks_float32, rounding_bound, run_validation

pytestmark = pytest.mark.gpu  # skipped without a CUDA device (tests/kernels/conftest.py)


def _inputs(batch=32, grid=64, size=224, channels=3, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a_t = (torch.rand(batch, grid * grid, device="cuda", generator=g) * 2 - 1).requires_grad_()
    b_t = (torch.rand(batch, grid * grid, device="cuda", generator=g) * 2 - 1).requires_grad_()
    x = torch.randn(batch, channels, size, size, device="cuda", generator=g).to(dtype)
    return a_t, b_t, x


def _step(masker, a_t, b_t, x):
    m, s = masker.sample_score(a_t, b_t)
    y = masker.apply(x, m)
    ga, gb = torch.autograd.grad(s.sum(), [a_t, b_t])
    return m, s, y, ga, gb


def test_graph_replays_draw_fresh_masks_and_match_eager_steps_of_the_same_seed():
    a_t, b_t, x = _inputs()
    masker = FastMasker(64, 224, seed=3).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels outside the capture
        for _ in range(2):
            _step(masker, a_t, b_t, x)
    torch.cuda.current_stream().wait_stream(side)
    masker.manual_seed(3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _step(masker, a_t, b_t, x)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([t.clone() for t in static])
    torch.cuda.synchronize()
    assert masker.rng_state.tolist() == [3, 3]  # advanced on the device by every replay
    assert (replays[0][0] != replays[1][0]).float().mean() > 0.99
    assert (replays[1][0] != replays[2][0]).float().mean() > 0.99
    eager = FastMasker(64, 224, seed=3).cuda()
    for got in replays:
        want = _step(eager, a_t, b_t, x)
        for g_t, w_t in zip(got, want):
            assert torch.equal(g_t, w_t)


def test_step_makes_no_host_sync_and_allocates_the_same_every_call():
    a_t, b_t, x = _inputs(seed=1)
    masker = FastMasker(64, 224, seed=1).cuda()
    _step(masker, a_t, b_t, x)
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            out = _step(masker, a_t, b_t, x)
            counts.append(torch.cuda.memory_stats()["allocation.all.allocated"] - before)
            del out
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert counts[0] == counts[1] == counts[2]


def test_nonfinite_flag_inside_a_graph_replay():
    a_t, b_t, x = _inputs(batch=4, seed=2)
    masker = FastMasker(64, 224).cuda()
    static_a = a_t.detach().clone()
    _step(masker, static_a.requires_grad_(), b_t, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        masker.sample_score(static_a, b_t)
    graph.replay()
    torch.cuda.synchronize()
    assert not masker.nonfinite.item()
    with torch.no_grad():
        static_a[2, 17] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert masker.nonfinite.item()


@pytest.mark.parametrize("channels,dtype,channels_last", [(1, torch.bfloat16, False), (3, torch.bfloat16, False),
                                                          (3, torch.bfloat16, True), (3, torch.float32, False)])
def test_apply_at_the_authors_shapes(channels, dtype, channels_last):
    _, _, x = _inputs(batch=256, channels=channels, dtype=dtype, seed=4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    masker = FastMasker(64, 224).cuda()
    m = torch.rand(256, 4096, device="cuda")
    y = masker.apply(x, m)
    a = masker.a_h.double()
    mask = (a @ m.double().view(-1, 64, 64) @ a.T).unsqueeze(1)
    exact = x.double() * mask
    bound = C_APPLY * EPS32 * x.double().abs() * mask + rounding_bound(dtype, exact) + 1e-30
    assert error_summary(y, exact, bound, rel_floor=1.0)["norm"] <= 1.0


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.3), (2.0, 9.0)])
def test_sampler_at_the_authors_shape_one_million_draws(alpha, beta):
    """n = 256 x 4096: the float32-aware KS test (level 1e-3) detects CDF errors above ~0.002."""
    masker = FastMasker(64, 224, seed=5).cuda()
    m, _ = masker.sample_score(torch.full((256, 4096), math.log(alpha), device="cuda"),
                               torch.full((256, 4096), math.log(beta), device="cuda"))
    assert ks_float32(m.flatten().cpu().numpy(), alpha, beta)[1] > 1e-3


def test_validate_passes_on_cuda():
    result = run_validation("cuda", seed=12, quick=True)
    assert result["backend"] == "triton" and result["passed"], result
