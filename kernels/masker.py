"""The fast mask step: the interface of :class:`~.reference.ReferenceMasker`, on the fused kernels.

``FastMasker(grid, crop_size, seed=0, backend="auto")`` is an ``nn.Module``:

- ``sample_score(a~, b~) -> (m, S)``: m float32 (B, G*G) without gradient, S (B,) differentiable in
  a~ and b~ (the backward is the closed form of docs/method.md §4, from terms saved by the
  forward);
- ``apply(images, m) -> masked images`` in the images' dtype and memory format;
- buffers: ``rng_state`` int64 [seed, step] (read by the kernel, advanced by one on the device after
  every ``sample_score``: a replayed CUDA graph draws fresh masks, the same seed repeats them),
  ``nonfinite`` bool (set on the device when a~ or b~ is not finite or S overflows, never cleared),
  and the fixed apply matrices and band starts. ``.to(device)`` moves them all; only
  ``rng_state`` is in the state dict, so a resumed run continues the mask stream.

Backends: ``"triton"`` (CUDA; also CPU tensors under ``TRITON_INTERPRET=1``, as the tests do),
``"torch"`` (the plain-torch path with the same math, for the CPU) and ``"auto"`` (Triton on CUDA,
torch elsewhere). Every input is checked before launch (shapes, dtypes, devices), with no host
sync; outputs are allocated the same way on every call of the same shape.
"""
from __future__ import annotations

import torch

from .mask_plan import TILE, axis_plan
from .reference import BLUR_KERNEL_SIZE, BLUR_SIGMA, _pair

ROUNDS = 8  # = sample_score.ROUNDS (the module is imported on first use)
_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CELLS = (1 << 32) // (ROUNDS + 1)  # Philox counter: cell * (ROUNDS + 1) + round < 2^32


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """The output of the Triton apply (tests poison it with NaN)."""
    return torch.empty_like(tensor)


def _ops():
    # imported on first use: importing triton decides interpreted or compiled kernels
    from . import mask_apply, sample_score
    return sample_score, mask_apply


class FastMasker(torch.nn.Module):
    """The mask step on fused kernels; see the module docstring."""

    def __init__(self, grid: int, crop_size, seed: int = 0, backend: str = "auto", tile: int = TILE,
                 kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA):
        super().__init__()
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
        height, width = _pair(crop_size)
        if grid < 1 or grid > min(height, width):
            raise ValueError(f"mask grid {grid} is larger than the crop size {height}x{width}")
        self.grid, self.crop_size, self.backend = grid, (height, width), backend
        # launch settings of the compiled kernels (block, num_warps / images_per_program, num_warps):
        # empty means the modules' defaults; bench/bench_kernels.py sweeps them on a GPU
        self.sample_launch: dict = {}
        self.apply_launch: dict = {}
        self.plan_h = axis_plan(grid, height, tile, kernel_size, sigma)
        self.plan_w = axis_plan(grid, width, tile, kernel_size, sigma)
        # Persistent: a resumed run continues the mask stream instead of replaying it.
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("a_h", self.plan_h.matrix, persistent=False)
        self.register_buffer("a_w", self.plan_w.matrix, persistent=False)
        self.register_buffer("starts_h", self.plan_h.starts, persistent=False)
        self.register_buffer("starts_w", self.plan_w.starts, persistent=False)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, crop_size={self.crop_size}, backend={self.backend!r}"

    def manual_seed(self, seed: int) -> None:
        """Restart the mask stream: seed ``seed``, step 0 (a host-to-device copy; not for a graph)."""
        self.rng_state.copy_(torch.tensor([seed, 0], dtype=torch.int64))

    def _use_triton(self, device: torch.device) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    def _check_device(self, what: str, tensor: torch.Tensor) -> None:
        if tensor.device != self.rng_state.device:
            raise ValueError(f"{what} is on {tensor.device} but the masker is on {self.rng_state.device}: "
                             f"move it with .to(device)")

    def sample_score(self, a_tilde: torch.Tensor, b_tilde: torch.Tensor):
        cells = self.grid ** 2
        if a_tilde.dim() != 2 or a_tilde.shape != b_tilde.shape or a_tilde.shape[1] != cells:
            raise ValueError(f"a~ {tuple(a_tilde.shape)} and b~ {tuple(b_tilde.shape)} must both be (B, {cells})")
        if a_tilde.dtype not in _FLOAT or b_tilde.dtype not in _FLOAT:
            raise ValueError(f"a~ and b~ must be floating point, not {a_tilde.dtype} and {b_tilde.dtype}")
        if a_tilde.dtype != b_tilde.dtype:
            raise ValueError(f"a~ and b~ must have the same dtype, not {a_tilde.dtype} and {b_tilde.dtype}")
        self._check_device("a~", a_tilde)
        self._check_device("b~", b_tilde)
        if a_tilde.numel() > _MAX_CELLS:
            raise ValueError(f"{a_tilde.numel()} cells exceed the sampler's counter range ({_MAX_CELLS})")
        m, s = _ops()[0].SampleScore.apply(a_tilde, b_tilde, self.rng_state, self.nonfinite,
                                  self._use_triton(a_tilde.device), self.sample_launch)
        self.rng_state[1:].add_(1)  # on the device: the next call (or graph replay) draws new masks
        return m, s

    def apply(self, images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        height, width = self.crop_size
        if images.dim() != 4 or tuple(images.shape[2:]) != (height, width):
            raise ValueError(f"images {tuple(images.shape)} must be (B, C, {height}, {width})")
        if images.dtype not in _IMAGE_DTYPES:
            raise ValueError(f"images must be float32, bfloat16 or float16, not {images.dtype}")
        if m.shape != (images.shape[0], self.grid ** 2) or m.dtype != torch.float32:
            raise ValueError(f"m {tuple(m.shape)} {m.dtype} must be float32 (B, {self.grid ** 2}) "
                             f"with B = {images.shape[0]} as in the images")
        self._check_device("images", images)
        self._check_device("m", m)
        if self.a_h.dtype != torch.float32:
            raise ValueError(f"the masker's apply matrices were cast to {self.a_h.dtype}: move the masker with "
                             f".to(device) only (its math is float32 whatever the image dtype)")
        mask_apply = _ops()[1]
        if not self._use_triton(images.device):
            return mask_apply.mask_apply_torch(images, m, self.a_h, self.a_w)
        out = _empty_like(images)  # same dtype and memory format
        return mask_apply.launch_mask_apply(images, out, m.contiguous(), self.plan_h, self.plan_w,
                                self.starts_h, self.starts_w, self.a_h, self.a_w, **self.apply_launch)
