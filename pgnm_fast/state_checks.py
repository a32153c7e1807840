"""Does a checkpoint fit the run about to use it? One line naming the file.

- :func:`check_fits`: architecture, policy model, grid and channels against the run's config,
  naming both sides and the flag that would make them agree.
- :func:`check_weights_fit`: the weights against this run's modules, built on the meta device,
  before the run starts.
- :func:`load_weights`: ``load_state_dict`` whose mismatch is one line naming the source.

Whether the file itself is sound (integrity, format, types, finite weights) is
:mod:`pgnm_fast.run_state`'s to check, as it reads it.
"""
from __future__ import annotations

import warnings

import torch

from .errors import CheckpointError, ConfigError


def check_fits(state, cfg, path, how: str) -> None:
    """Raise :class:`ConfigError` when the checkpoint ``state`` (a
    :class:`~pgnm_fast.run_state.RunState` read from ``path``, used as ``how``: ``--resume`` or
    ``--from``) was made for another classifier, policy, grid or channel count than ``cfg``."""
    sides = [("--model", state.model_name, cfg.model), ("channels", state.in_chans, cfg.channels)]
    if how == "--resume" and state.policy is not None:
        saved = state.config
        sides += [("--policy-model", state.policy_model or saved.get("policy_model"),
                   cfg.policy_model), ("--grid", saved.get("grid"), cfg.grid)]
    for flag, theirs, ours in sides:
        if theirs is not None and theirs != ours:
            fix = (f"drop {flag} (or pass {flag} {theirs})" if flag.startswith("--")
                   else "use data with as many channels")
            raise ConfigError(f"{how} {path} holds a {flag.lstrip('-')} {theirs} checkpoint, this "
                              f"run asks for {ours}: {fix}")


def load_weights(module: torch.nn.Module, weights: dict, source: str,
                 what: str = "classifier", strict: bool = True, assign: bool = False):
    """``module.load_state_dict(weights, strict, assign)``; a mismatch is one line naming
    ``source`` (such as ``checkpoint runs/x/last.pt``). Returns load_state_dict's result."""
    try:
        return module.load_state_dict(weights, strict=strict, assign=assign)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"{source}: its {what} weights do not fit this run's {what} "
                              f"({first[:200]})") from None


def check_weights_fit(state, cfg, classes: list, path, how: str) -> None:
    """Load the checkpoint's weights into this run's modules built on the meta device (no
    memory, no compute): a shape mismatch is one line naming ``how`` and ``path`` before the run
    starts. A classifier head for other classes is left out (it is replaced)."""
    from .models import PolicyNet, create_model
    with torch.device("meta"):
        model = create_model(cfg.model, len(classes), in_chans=cfg.channels)
        policy = PolicyNet(grid=cfg.grid, in_chans=cfg.channels, trunk=cfg.policy_model) \
            if how == "--resume" and cfg.policy else None
    weights, strict = state.model, True
    if list(state.classes) != list(classes):
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
        strict = False
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": the point
        warnings.simplefilter("ignore")
        missing, unexpected = load_weights(model, weights, f"{how} {path}", strict=strict)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(f"{how} {path}: its classifier weights do not fit {cfg.model} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if policy is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_weights(policy, state.policy or {}, f"{how} {path}", "policy")
