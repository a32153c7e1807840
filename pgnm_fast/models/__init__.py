"""Classifier and policy networks (docs/method.md §2), timm-compatible without timm."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from pgnm_fast.errors import CheckpointError, ConfigError
from pgnm_fast.models.policy import PolicyNet, PolicyOutput, policy_state_from_authors
from pgnm_fast.models.resnet import FIRST_CONV, MODEL_CFGS, ResNet, check_model_name, create_resnet

__all__ = ['create_model', 'model_names', 'adapt_input_conv', 'convert_to_grey', 'ResNet',
           'PolicyNet', 'PolicyOutput', 'policy_state_from_authors', 'POLICY_TRUNK_PREFIX']

POLICY_TRUNK_PREFIX = 'fe.'  # PolicyNet's trunk attribute, as the authors name it


def model_names() -> list[str]:
    return list(MODEL_CFGS)


def create_model(name: str, num_classes: int, in_chans: int = 1, **kwargs) -> nn.Module:
    """A classifier by timm name (random init). Extra kwargs go to ResNet (drop_rate, ...)."""
    return create_resnet(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """timm's `adapt_input_conv`: a stem weight (O, 3, kh, kw) for `in_chans` input channels.

    in_chans=1 sums over the input channels: exact for a grey image fed as 3 identical channels.
    Other counts repeat the RGB weights and rescale by 3/in_chans (timm's heuristic, not exact).
    Summed in float32, returned in the input dtype.
    """
    dtype = conv_weight.dtype
    w = conv_weight.float()
    c = w.shape[1]
    if in_chans == c:
        return conv_weight
    if in_chans == 1:
        if c % 3:
            raise ConfigError(f"cannot convert a {c}-channel stem to 1 channel (need a multiple of 3)")
        w = w.reshape(w.shape[0], c // 3, 3, *w.shape[2:]).sum(2)
    elif c == 3:
        w = w.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    else:
        raise ConfigError(f"cannot convert a {c}-channel stem to {in_chans} channels")
    return w.to(dtype)


def convert_to_grey(state_dict: Mapping[str, torch.Tensor], model_name: str,
                    prefix: str = '') -> dict[str, torch.Tensor]:
    """The 1-channel form of a 3-channel state dict: only the stem conv changes (summed weights).

    model_name: a classifier name (stem key `conv1.weight`, or `conv1.0.weight` for resnet10t), or
    'policy' for a PolicyNet state dict (resnet10t trunk under `fe.`). `prefix` is prepended to the
    stem key, e.g. 'module.' for a DDP state dict, or 'fe.' for a policy with another trunk.
    A state dict already in 1-channel form is returned unchanged (as a new dict).
    """
    if model_name == 'policy':
        model_name, prefix = 'resnet10t', POLICY_TRUNK_PREFIX + prefix
    check_model_name(model_name)
    key = f'{prefix}{FIRST_CONV[model_name]}.weight'
    if key not in state_dict:
        raise CheckpointError(f"state dict has no stem weight {key!r}: is it a {model_name} checkpoint?")
    out = dict(state_dict)
    out[key] = adapt_input_conv(1, state_dict[key])
    return out
