"""make_masker, the FastMasker module and ``pgnm-fast validate`` (CPU: the torch fast path, and the
Triton code under the interpreter)."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast.cli import validate
from pgnm_fast.errors import ConfigError
from pgnm_fast.kernels import FastMasker, ReferenceMasker, make_masker
from pgnm_fast.kernels.checks import ks_float32, run_validation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_make_masker_builds_either_implementation():
    assert isinstance(make_masker("reference", 8, 32), ReferenceMasker)
    fast = make_masker("fast", 8, 32, seed=5)
    assert isinstance(fast, FastMasker) and fast.rng_state.tolist() == [5, 0]
    with pytest.raises(ConfigError, match="--impl 'triton' is not one of reference, fast"):
        make_masker("triton", 8, 32)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_both_implementations_share_the_interface(impl):
    masker = make_masker(impl, 8, 32).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    a_t = torch.randn(3, 64, generator=g).to(DEVICE).requires_grad_()
    b_t = torch.randn(3, 64, generator=g).to(DEVICE).requires_grad_()
    m, s = masker.sample_score(a_t, b_t)
    assert m.shape == (3, 64) and m.dtype == torch.float32 and not m.requires_grad
    assert s.shape == (3,) and s.requires_grad
    s.sum().backward()
    assert torch.isfinite(a_t.grad).all() and torch.isfinite(b_t.grad).all() and a_t.grad.abs().sum() > 0
    x = torch.randn(3, 3, 32, 32, generator=g).to(DEVICE).bfloat16().to(memory_format=torch.channels_last)
    y = masker.apply(x, m)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert masker.nonfinite.dtype == torch.bool and not masker.nonfinite.item()
    # only the fast mask stream's position is checkpointed (the reference draws from torch's
    # global generator, which the trainer checkpoints): a resumed run continues it
    assert list(masker.state_dict()) == ([] if impl == "reference" else ["rng_state"])
    fresh = make_masker(impl, 8, 32, seed=99).to(DEVICE)
    fresh.load_state_dict(masker.state_dict())
    if impl == "fast":
        assert fresh.rng_state.tolist() == masker.rng_state.tolist() == [0, 1]


def test_to_moves_every_buffer_and_auto_picks_the_torch_path_off_cuda():
    masker = FastMasker(8, 32)
    moved = masker.to("meta")
    assert {b.device.type for b in moved.buffers()} == {"meta"}
    assert not FastMasker(8, 32)._use_triton(torch.device("cpu"))
    assert FastMasker(8, 32)._use_triton(torch.device("cuda"))
    assert FastMasker(8, 32, backend="triton")._use_triton(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be"):
        FastMasker(8, 32, backend="cuda")


def test_casting_the_masker_to_another_dtype_is_refused_clearly():
    masker = FastMasker(8, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"cast to torch.bfloat16: move the masker with .to\(device\) only"):
        masker.apply(torch.randn(1, 1, 32, 32), torch.rand(1, 64))


@pytest.mark.slow
def test_cpu_fast_path_sampler_follows_the_beta_law():
    """The torch path's sampler at n = 16384 (level 1e-3 per test, 4 tests)."""
    masker = FastMasker(64, 224, seed=4, backend="torch")
    for alpha, beta in [(0.05, 0.3), (0.7, 0.7), (3.0, 40.0), (50.0, 2.0)]:
        a_t = torch.full((4, 4096), math.log(alpha))
        b_t = torch.full((4, 4096), math.log(beta))
        m, _ = masker.sample_score(a_t, b_t)
        assert ks_float32(m.flatten().numpy(), alpha, beta)[1] > 1e-3


def test_gradients_do_not_depend_on_autocast():
    masker = FastMasker(4, 16, seed=2, backend="torch")
    g = torch.Generator().manual_seed(3)
    a_t = torch.randn(2, 16, generator=g).requires_grad_()
    b_t = torch.randn(2, 16, generator=g).requires_grad_()
    _, s = masker.sample_score(a_t, b_t)
    masker.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, s_amp = masker.sample_score(a_t, b_t)
    assert s_amp.dtype == torch.float32 and torch.equal(s, s_amp)


@pytest.mark.slow
def test_validate_passes_on_the_cpu_fast_path_and_writes_json(tmp_path):
    path = tmp_path / "v.json"
    result = CliRunner().invoke(validate, ["--device", "cpu", "--quick", "--seed", "7", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "power" in result.output
    data = json.loads(path.read_text())
    assert data["passed"] is True and data["seed"] == 7 and data["backend"] == "torch"
    assert all(r["passed"] for r in data["sampling"]["power"])  # the swapped sampler was rejected
    assert data["sampling"]["pairs"][0]["n"] == 8192
    # the loader's resize and a captured step, as the self-check compares them
    assert {p: r["ok"] for p, r in data["other_fast_paths"].items()} == {"resized_crop": True, "graphed_step": True}
    assert "resized crop (the device loader's resize against its integer reference): ok" in result.output


@pytest.mark.slow
def test_validate_fails_when_a_check_fails(monkeypatch, tmp_path):
    """Exit status 1 and "passed": false when one check fails (here: apply tolerance set to 0)."""
    import pgnm_fast.kernels.checks as v
    monkeypatch.setattr(v, "C_APPLY", 0.0)
    monkeypatch.setattr(v, "ROUNDING", {k: (0.0, 0.0) for k in v.ROUNDING})
    path = tmp_path / "v.json"
    result = CliRunner().invoke(validate, ["--quick", "--seed", "1", "--json", str(path)])
    assert result.exit_code == 1 and "FAILED" in result.output
    data = json.loads(path.read_text())
    assert data["passed"] is False and data["apply"]["passed"] is False and data["sampling"]["passed"] is True


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.triton
def test_validate_passes_on_the_triton_kernels():
    """The whole quick validation with the Triton code (interpreted here, about 11 s)."""
    result = run_validation(DEVICE, seed=11, quick=True, backend="triton")
    assert result["backend"] == "triton" and result["passed"], result
