"""The PGNM mask step in plain PyTorch: the reference every fast path is checked against.

docs/method.md §3 and §4, written for clarity, not speed:
- sample m ~ Beta(exp a~, exp b~) per grid cell with ``torch.distributions`` (no gradient through m),
- score it: log p per cell, S = logsumexp over the cells of each image (stable form),
- mask the normalised image with nearest-upsample + reflect-padded Gaussian blur (k 13, sigma 6)
  of the grid, broadcast over channels.

The mask is linear and separable in the grid, so it also equals ``A_h @ m @ A_w^T`` with a fixed
matrix ``A = Blur @ Up`` (:func:`upsample_blur_matrix`); :func:`mask_image_matrix` is that second
form, tested equal to :func:`mask_image`, and the fused apply kernel is built on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Beta

BLUR_KERNEL_SIZE = 13
BLUR_SIGMA = 6.0


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def gaussian_kernel1d(kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA,
                      dtype=torch.float32) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` kernel: pdf on ``linspace(-k//2, k//2, k)``, normalised."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(dtype)


def mask_image(m: torch.Tensor, size, kernel_size: int = BLUR_KERNEL_SIZE,
               sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """The mask image (B, 1, H, W) of grid samples m (B, G*G) or (B, 1, G, G), as the authors do it:
    nearest upsample, then torchvision-style Gaussian blur (reflect padding, one 2-D kernel)."""
    height, width = _pair(size)
    grid = int(round(m[0].numel() ** 0.5))
    x = m.reshape(m.shape[0], 1, grid, grid).float()
    x = F.interpolate(x, size=(height, width), mode="nearest")
    k1 = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype).to(x.device)
    k2 = torch.outer(k1, k1)[None, None]
    pad = kernel_size // 2
    x = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(x, k2)


def upsample_blur_matrix(grid: int, size: int, kernel_size: int = BLUR_KERNEL_SIZE,
                         sigma: float = BLUR_SIGMA, dtype=torch.float32,
                         device=None) -> torch.Tensor:
    """The fixed (size x grid) matrix ``A = Blur @ Up`` of one image axis.

    ``Up`` is PyTorch's ``mode="nearest"`` index map (taken from ``F.interpolate`` itself, so the
    rounding is identical) and ``Blur`` the 1-D Gaussian with reflect padding (edge not repeated).
    Built in float64, then cast.
    """
    if grid > size:
        raise ValueError(f"mask grid {grid} is larger than the crop size {size}")
    src = F.interpolate(torch.arange(grid, dtype=torch.float64).view(1, 1, grid), size=size,
                        mode="nearest").view(size).long()
    up = torch.zeros(size, grid, dtype=torch.float64)
    up[torch.arange(size), src] = 1.0
    k1 = gaussian_kernel1d(kernel_size, sigma, dtype=torch.float64)
    pad = kernel_size // 2
    if pad >= size:
        raise ValueError(f"blur kernel {kernel_size} needs a crop of at least {pad + 1} pixels")
    blur = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for t in range(kernel_size):
            j = i + t - pad
            j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)  # reflect
            blur[i, j] += k1[t]
    return (blur @ up).to(dtype=dtype, device=device)


def mask_image_matrix(m: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor | None = None) -> torch.Tensor:
    """The same mask image as :func:`mask_image`, as ``A_h @ m_grid @ A_w^T`` (B, 1, H, W)."""
    a_w = a_h if a_w is None else a_w
    grid = a_h.shape[1]
    x = m.reshape(m.shape[0], grid, grid).to(a_h.dtype)
    return (a_h @ x @ a_w.T).unsqueeze(1)


def mask_apply(images: torch.Tensor, m: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE,
               sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Multiply the normalised images (B, C, H, W) by the mask of m, broadcast over channels."""
    mask = mask_image(m, images.shape[-2:], kernel_size, sigma)
    return (images.float() * mask).to(images.dtype)


def beta_log_prob(m: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log Beta(m; alpha, beta), docs/method.md §4 (differentiable in alpha and beta)."""
    return ((alpha - 1) * torch.log(m) + (beta - 1) * torch.log1p(-m)
            - torch.lgamma(alpha) - torch.lgamma(beta) + torch.lgamma(alpha + beta))


def stable_logsumexp(logp: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """S = log(sum(exp(logp))) computed with the max shift, finite wherever logp is.

    The authors' ``log(sum(exp(.)))`` overflows to inf for peaked Betas (density > 3.4e38 in
    float32); this is the same value wherever that form is finite."""
    return torch.logsumexp(logp, dim=dim)


def sample_and_score(a_tilde: torch.Tensor, b_tilde: torch.Tensor):
    """Sample m ~ Beta(exp a~, exp b~) (B, G*G) and score it.

    Returns ``(m, logp, S)``: m float32 without gradient, logp (B, G*G) and S (B,) differentiable
    in a~ and b~. Math in float32 whatever the input dtype or autocast state.
    """
    with torch.autocast(a_tilde.device.type, enabled=False):
        alpha = a_tilde.float().exp()
        beta = b_tilde.float().exp()
        dist = Beta(alpha, beta, validate_args=False)
        m = dist.sample()  # torch clamps to [tiny, 1 - eps]: logs stay finite
        logp = dist.log_prob(m)
        return m, logp, stable_logsumexp(logp, dim=1)


class ReferenceMasker(torch.nn.Module):
    """The mask step of one training step, reference implementation.

    ``sample_score(a~, b~) -> (m, S)`` and ``apply(images, m) -> masked images`` is the interface
    the trainer uses for every implementation. ``nonfinite`` is a device-side flag set when a~ or b~
    held a NaN or inf: the trainer reads it with its metrics (no host sync in the step).
    """

    def __init__(self, grid: int, crop_size, kernel_size: int = BLUR_KERNEL_SIZE,
                 sigma: float = BLUR_SIGMA):
        super().__init__()
        height, width = _pair(crop_size)
        if grid > min(height, width):
            raise ValueError(f"mask grid {grid} is larger than the crop size {height}x{width}")
        self.grid, self.crop_size = grid, (height, width)
        self.kernel_size, self.sigma = kernel_size, sigma
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    def sample_score(self, a_tilde: torch.Tensor, b_tilde: torch.Tensor):
        if a_tilde.shape != b_tilde.shape or a_tilde.shape[-1] != self.grid ** 2:
            raise ValueError(f"a~ {tuple(a_tilde.shape)} and b~ {tuple(b_tilde.shape)} must both be "
                             f"(B, {self.grid ** 2})")
        bad = ~(torch.isfinite(a_tilde).all() & torch.isfinite(b_tilde).all())
        self.nonfinite.logical_or_(bad.to(self.nonfinite.device))
        m, _, S = sample_and_score(a_tilde, b_tilde)
        return m, S

    def apply(self, images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return mask_apply(images, m, self.kernel_size, self.sigma)
