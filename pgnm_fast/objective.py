"""The PGNM objective (docs/method.md §4): one scalar, one backward, both optimisers step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError


def pgnm_loss(S: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
              label_smoothing: float = 0.0, group: int | None = None):
    """``loss = mean_b(S[b]) * CE`` as published; returns ``(loss, ce)``, ``ce`` the mean CE over
    the batch.

    The policy is trained by REINFORCE with reward -CE and no baseline (gradient through S), and
    the classifier's CE gradient is scaled by mean(S) (about log G^2 at the start). Both are part
    of the method; CE is computed in float32 at least, whatever the autocast dtype (float64 stays
    float64). ``label_smoothing`` (``--label-smoothing``, 0 in the paper) smooths the CE, and so
    the policy's reward too.

    ``group`` (the reward group): the batch is cut into groups of ``group`` consecutive images
    and the loss is the mean over the groups of ``mean_g(S) * CE_g``, the objective of the
    authors' 8 processes of 32 images whose gradients DistributedDataParallel averages. It
    differs from the whole-batch product by the covariance of S and CE across the groups. None,
    or a group at least the batch, is the whole-batch product.
    """
    batch = target.shape[0]
    if group is None or group >= batch:
        ce = F.cross_entropy(_wide(logits), target, label_smoothing=label_smoothing)
        return _wide(S).mean() * ce, ce
    if group <= 0 or batch % group:
        raise ConfigError(f"the reward group of {group} images must divide the batch of {batch} "
                          f"images")
    per_image = F.cross_entropy(_wide(logits), target, label_smoothing=label_smoothing,
                                reduction="none")
    ce_g = per_image.view(-1, group).mean(1)
    s_g = _wide(S).view(-1, group).mean(1)
    return (s_g * ce_g).mean(), per_image.mean()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 where it already is."""
    return t if t.dtype == torch.float64 else t.float()
