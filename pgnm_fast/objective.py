"""The PGNM objective (docs/method.md §4): one scalar, one backward, both optimisers step."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pgnm_loss(S: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
              label_smoothing: float = 0.0):
    """``loss = mean_b(S[b]) * CE`` as published; returns ``(loss, ce)``.

    The policy is trained by REINFORCE with reward -CE and no baseline (gradient through S), and
    the classifier's CE gradient is scaled by mean(S) (about log G^2 at the start). Both are part
    of the method; CE is computed in float32 whatever the autocast dtype. ``label_smoothing``
    (``--label-smoothing``, 0 in the paper) smooths the CE, and so the policy's reward too.
    """
    ce = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    return S.float().mean() * ce, ce
