"""The PGNM policy network (docs/method.md §2 and §3).

Module names follow the authors' `MaskGenerator` (create_model.py in
ogrenenmakine/Policy-Gradient-Driven-Noise-Mask): `fe` is the timm resnet10t trunk without head,
`alpha` and `beta` the two heads (nn.Sequential, indices 0-6), so the `policy_net` entries of their
checkpoints load by name. The authors keep the base tensors outside the module (top-level
`base_alpha` / `base_beta` entries of the checkpoint, shape 1 x G^2); here they are persistent
buffers of the same names, and `policy_state_from_authors` merges the two into one state dict.

Unlike the authors' forward, the heads run once per step and the base update is a separate,
in-place, graph-capturable method (docs/method.md §7 and §8).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

from pgnm_fast.errors import CheckpointError
from pgnm_fast.models.resnet import create_resnet


class PolicyOutput(NamedTuple):
    a_tilde: torch.Tensor  # B x G^2, log of the Beta's alpha
    b_tilde: torch.Tensor  # B x G^2, log of the Beta's beta
    h_a: torch.Tensor      # B x G^2, raw alpha-head output (feeds update_base)
    h_b: torch.Tensor      # B x G^2, raw beta-head output


def _head(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, out))


class PolicyNet(nn.Module):
    """Image-conditional Beta parameters on a G x G grid.

    a~ = decay * base_alpha + (1 - decay) * alpha(fe(x)), b~ likewise (decay = 0.9);
    after the optimiser step, `update_base(h_a, h_b)` moves the bases by an EMA (momentum 0.99).
    """

    def __init__(self, grid: int = 64, in_chans: int = 1, trunk: str = 'resnet10t',
                 decay: float = 0.9, base_momentum: float = 0.99):
        super().__init__()
        self.grid = grid
        self.decay = decay
        self.base_momentum = base_momentum
        cells = grid * grid
        self.fe = create_resnet(trunk, num_classes=0, in_chans=in_chans)
        width = self.fe.num_features
        self.alpha = _head(width, cells)
        self.beta = _head(width, cells)
        # Never trained by gradient: buffers, not parameters. U(0,1) as the authors' torch.rand.
        self.register_buffer('base_alpha', torch.rand(1, cells))
        self.register_buffer('base_beta', torch.rand(1, cells))

    def forward(self, x: torch.Tensor) -> PolicyOutput:
        feats = self.fe(x)
        h_a = self.alpha(feats)  # each head exactly once per step
        h_b = self.beta(feats)
        d = self.decay
        a_tilde = self.base_alpha * d + h_a * (1.0 - d)
        b_tilde = self.base_beta * d + h_b * (1.0 - d)
        return PolicyOutput(a_tilde, b_tilde, h_a, h_b)

    @torch.no_grad()
    def update_base(self, h_a: torch.Tensor, h_b: torch.Tensor) -> None:
        """base <- m * base + (1 - m) * mean_batch(h), in place; no host sync, CUDA-graph safe."""
        m = self.base_momentum
        for base, h in ((self.base_alpha, h_a), (self.base_beta, h_b)):
            mean = torch.mean(h.detach(), 0, keepdim=True, dtype=base.dtype)
            base.mul_(m).add_(mean, alpha=1.0 - m)

    def unconditional(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a~, b~) of the unconditional mask Beta(exp A_a, exp A_b), as (batch_size, G^2) views of
        the base buffers (stride 0 over the batch; they alias the buffers, copy before updating)."""
        shape = (batch_size, self.grid * self.grid)
        return self.base_alpha.expand(shape), self.base_beta.expand(shape)


def policy_state_from_authors(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """One PolicyNet state dict from an authors' checkpoint dict (keys `policy_net`, `base_alpha`,
    `base_beta`, as their train.py saves them). A `module.` prefix (DDP) is stripped."""
    missing = [k for k in ('policy_net', 'base_alpha', 'base_beta') if k not in checkpoint]
    if missing:
        raise CheckpointError(f"not an authors' PGNM checkpoint: missing {', '.join(missing)}")
    state = {k.removeprefix('module.'): v for k, v in checkpoint['policy_net'].items()}
    for name in ('base_alpha', 'base_beta'):
        base = torch.as_tensor(checkpoint[name]).detach().float()
        state[name] = base.reshape(1, -1).cpu()
    return state
