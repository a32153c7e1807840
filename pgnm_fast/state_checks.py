"""Does a checkpoint fit the run about to use it? One line naming the file.

- :func:`check_fits`: architecture, policy model, grid and channels against the run's config,
  naming both sides and the flag that would make them agree.
- :func:`check_weights_fit`: the weights against this run's modules, built on the meta device,
  before the run starts.
- :func:`load_weights`: ``load_state_dict`` whose mismatch is one line naming the source.
- The shape of weights read from outside (:mod:`pgnm_fast.weights`): :func:`refuse_foreign_file`
  (a text file, an image, a zip archive that is not a PyTorch checkpoint ... named as such),
  :func:`check_state_dict`, :func:`check_head` and :func:`check_finite_weights` (NaN / inf refused
  unless ``PGNM_FAST_ALLOW_NONFINITE_WEIGHTS=1`` asks to load them for inspection).

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


# ----------------------------------------------------------------------------------------------
# The shape of weights read from outside (pgnm_fast.weights): one line naming the file and key

NONFINITE_ENV = "PGNM_FAST_ALLOW_NONFINITE_WEIGHTS"  # "1": load NaN / inf weights for inspection
EXPECTED_FORMS = ("a .pth/.pt/.bin state dict, a .safetensors file or a timm / Hugging Face "
                  "model folder")
_MAGIC = [(b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"GIF8", "a GIF image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
          (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a NumPy .npy array"),
          (b"\x89HDF", "an HDF5 file"), (b"%PDF", "a PDF document")]


def _is_text(head: bytes) -> bool:
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the sample is still text
        if e.start < len(head) - 3:
            return False
        text = head[:e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def file_kind(path) -> str | None:
    """What a file that is not weights is (a PNG image, a text file, a zip archive that is not a
    PyTorch checkpoint, ...); None when it may be weights."""
    import zipfile
    with open(path, "rb") as f:
        head = f.read(4096)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) > 132 and head[128:132] == b"DICM":
        return "a DICOM image"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return None  # a torch archive cut short: torch.load names it
        return "a zip archive but not a PyTorch checkpoint (no data.pkl in it)"
    if _is_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        return f"a text file (it begins {first[0][:40]!r})" if first else "a text file"
    return None


def refuse_foreign_file(path) -> None:
    """Raise naming the kind of ``path`` when it is plainly not weights (see :func:`file_kind`)."""
    kind = file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a weights file: expected {EXPECTED_FORMS}")


def json_type(value) -> str:
    """The JSON name of a parsed value's type (object, array, string, ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_state_dict(obj, where: str) -> dict:
    """``obj`` when it is a state dict (parameter name -> tensor), else one line naming
    ``where`` (such as ``x.pth: 'model'``), the first wrong key and what was expected."""
    if not isinstance(obj, dict) or not obj:
        what = "empty" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{where} is {what}: expected a state dict (parameter name -> "
                              f"tensor)")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where} has a key {key!r} of type {type(key).__name__}: "
                                  f"expected parameter names (str) -> tensors")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: {key!r} holds a {type(value).__name__}, expected "
                                  f"a tensor")
    return obj


def check_head(state: dict, where, features: int | None = None, model_name: str = "") -> None:
    """The classifier head ``fc``: a 2-D weight (classes x ``features``) and a bias of one value
    per class. One line naming ``where``, the key, its shape and the expected one."""
    weight, bias = state.get("fc.weight"), state.get("fc.bias")
    if weight is None:
        if bias is not None:
            raise CheckpointError(f"weights in {where}: fc.bias without fc.weight")
        return
    if weight.dim() != 2:
        raise CheckpointError(f"weights in {where}: fc.weight has shape {tuple(weight.shape)}, "
                              f"expected (classes, features)")
    rows = int(weight.shape[0])
    if features is not None and int(weight.shape[1]) != features:
        raise CheckpointError(f"weights in {where}: fc.weight has shape {tuple(weight.shape)}, "
                              f"expected ({rows}, {features}) for {model_name}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise CheckpointError(f"weights in {where}: fc.bias has shape {tuple(bias.shape)}, "
                              f"expected ({rows},) (one per row of fc.weight "
                              f"{tuple(weight.shape)})")


def allow_nonfinite() -> bool:
    import os
    return os.environ.get(NONFINITE_ENV, "") not in ("", "0")


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_weights(state: dict, where, allow: bool | None = None) -> None:
    """Refuse weights holding NaN or inf, naming the first; loaded anyway (for inspection) when
    the environment sets ``PGNM_FAST_ALLOW_NONFINITE_WEIGHTS=1``, unless ``allow`` is False."""
    if allow is None:
        allow = allow_nonfinite()
    name = None if allow else first_nonfinite(state)
    if name is not None:
        raise CheckpointError(f"weights in {where}: {name} is not finite (NaN or inf); "
                              f"`pgnm-fast --allow-nonfinite-weights ...` loads it anyway for "
                              f"inspection")
