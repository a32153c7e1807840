"""Is a checkpoint sound, and does it fit the run about to use it? One line naming the file.

- :func:`verify_integrity`: every record of the file (``torch.save`` writes a zip archive) against
  its CRC-32, which ``torch.load`` does not check: a flipped byte in a weight is found here.
- :func:`check_types`: the metadata a stage reads has the types it expects.
- :func:`check_finite`: no NaN or infinite weight (a diverged run's weights are refused by
  ``eval``, ``--resume`` and ``finetune --from``).
- :func:`check_fits`: architecture, policy model, grid and channels against the run's config,
  naming both sides and the flag that would make them agree.
"""
from __future__ import annotations

import warnings
import zipfile

import torch

from .errors import CheckpointError, ConfigError

STAGES = ("heated", "baseline", "finetune")


def verify_integrity(path) -> None:
    """Raise :class:`CheckpointError` if a record of the zip archive at ``path`` does not match
    its CRC-32 (the file was damaged after it was written)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its record {bad} does not match its "
                              f"checksum (the file changed after it was written)")


def _state_dict_ok(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def check_types(state: dict, path) -> None:
    """The fields every stage reads, with the types it reads them as."""
    checks = [
        ("stage", state.get("stage") in STAGES, f"one of {', '.join(STAGES)}"),
        ("epoch", isinstance(state.get("epoch"), int) and state["epoch"] >= 0,
         "a non-negative integer"),
        ("model_name", isinstance(state.get("model_name"), str), "a model name"),
        ("classes", isinstance(state.get("classes"), (list, tuple)) and len(state["classes"]) > 0
         and all(isinstance(c, str) for c in state["classes"]), "a list of class names"),
        ("config", isinstance(state.get("config"), dict), "a dict of settings"),
        ("model", _state_dict_ok(state.get("model")), "a dict of tensors"),
    ]
    if "policy" in state:
        checks.append(("policy", _state_dict_ok(state["policy"]), "a dict of tensors"))
    if "best_f1" in state:
        checks.append(("best_f1", isinstance(state["best_f1"], (int, float)), "a number"))
    for key, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"checkpoint {path}: '{key}' is not {expected} (written by "
                                  f"another tool or damaged)")


def check_finite(state: dict, path) -> None:
    """Raise :class:`CheckpointError` naming the first weight with a NaN or infinite value."""
    for part in ("model", "policy"):
        for name, tensor in (state.get(part) or {}).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"checkpoint {path}: {part} weight {name} is not finite "
                                      f"(NaN or inf: saved from a diverged run); use an earlier "
                                      f"checkpoint")


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
