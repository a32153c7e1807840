"""Weights in and out: every form a classifier arrives in, and the timm folder it leaves as.

In (:func:`read_weights`): a pgnm-fast checkpoint; a plain state dict in ``.pth`` / ``.pt`` /
``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``; a timm / Hugging Face model
folder (``model.safetensors`` + ``config.json``); the authors' checkpoints (a dict with ``model``
and usually ``policy_net``, ``base_alpha``, ``base_beta``, ``args``; keys possibly prefixed
``module.`` or ``_orig_mod.``, 3-channel stem). Pickles are read weights-only: a file that needs
code to unpickle is refused (only ``argparse.Namespace``, the authors' ``args``, is allowed).
Every form is checked for its shape before use (:mod:`pgnm_fast.state_checks`): a state dict of
name -> tensor, a head whose bias matches its weight, a ``config.json`` object whose
``label_names`` match the head, finite weights; a mismatch is one line naming the file and key.

Fitting (:func:`fit_classifier`): a head whose class count differs is replaced, a 3-channel stem
is summed to 1 channel for grey runs (exact for grey images, docs/method.md §1), and weights of
another architecture are refused naming the first mismatched keys and the model they look like.
A summed stem trains with the 3-channel stem's steps (:func:`pgnm_fast.optim.param_groups`).

A pgnm-fast checkpoint is read and checked by :mod:`pgnm_fast.run_state` (the one reader of that
format): its :class:`Weights` carries the :class:`~pgnm_fast.run_state.RunState`. This module
reads the outside forms.

Out (:func:`export`): ``model.safetensors`` + a timm ``config.json`` that
``timm.create_model('local-dir:DIR', pretrained=True)`` loads, or a TorchScript module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_open
from .errors import CheckpointError, ConfigError, first_line
from .models import POLICY_TRUNK_PREFIX, convert_to_grey, create_model, model_names
from .models.resnet import FIRST_CONV
from .optim import STEM_LR_SCALE
from .run_state import RunState, is_run_state, run_state_from
from .state_checks import (
    check_finite_weights,
    check_head,
    check_state_dict,
    first_nonfinite,
    json_type,
    load_weights,
    refuse_foreign_file,
)

PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
SAFETENSORS = ".safetensors"


@dataclasses.dataclass
class Weights:
    """A classifier's weights and what the file says about them (None: it does not say)."""
    path: Path
    kind: str                      # "pgnm-fast", "state dict", "timm folder", "authors'"
    model: dict                    # state dict, timm key names, stem as stored
    model_name: str | None = None
    classes: list | None = None
    policy: dict | None = None     # PolicyNet state dict (base buffers included)
    state: RunState | None = None  # the whole pgnm-fast checkpoint
    meta: dict = dataclasses.field(default_factory=dict)  # config.json of a timm folder

    @classmethod
    def from_run_state(cls, state: RunState, path=None) -> Weights:
        """The weights of a pgnm-fast checkpoint (read from ``path``, default its source)."""
        path = Path(path) if path is not None else state.source
        return cls(path, "pgnm-fast", state.model, state.model_name, list(state.classes),
                   state.policy, state)

    @property
    def num_classes(self) -> int:
        w = self.model.get("fc.weight")
        return int(w.shape[0]) if w is not None else 0

    @property
    def in_chans(self) -> int | None:
        stem = _stem_key(self.model, self.model_name)
        return int(self.model[stem].shape[1]) if stem else None


def _stem_key(state: dict, name: str | None) -> str | None:
    names = [name] if name in FIRST_CONV else list(FIRST_CONV)
    for n in names:
        key = f"{FIRST_CONV[n]}.weight"
        if key in state and len(getattr(state[key], "shape", state[key])) == 4:
            return key
    return None


def strip_prefixes(state: dict) -> dict:
    """Keys without the ``module.`` / ``_orig_mod.`` wrappers' prefixes (any order, repeated)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _torch_load(path: Path):
    refuse_foreign_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "Weights only load failed" in text:
            what = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")
            raise CheckpointError(
                f"{path} needs code to unpickle ({what.split(' was ')[0] or 'a custom class'}): "
                f"refused, weights are read weights-only; save its state_dict() instead") from None
        raise CheckpointError(f"{path} is not a checkpoint (unreadable pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError,
            KeyError, TypeError) as e:
        reason = first_line(e)
        raise CheckpointError(f"{path} is not a checkpoint or is truncated "
                              f"({reason[:120]})") from None


def _safetensors_load(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    refuse_foreign_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = first_line(e)
        raise CheckpointError(f"{path} is not a safetensors file ({reason[:120]})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_weights(path) -> Weights:
    """The classifier (and policy) weights in ``path``, in any form of the module docstring."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_folder(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == SAFETENSORS:
        return _from_state_dict(path, _safetensors_load(path), "state dict")
    obj = _torch_load(path)
    if is_run_state(obj):  # checked as every checkpoint is (pgnm_fast.run_state)
        w = Weights.from_run_state(run_state_from(obj, path))
        check_head(w.model, path)
        if "fc.weight" in w.model and len(w.classes) != w.num_classes:
            raise CheckpointError(f"checkpoint {path}: 'classes' names {len(w.classes)}, its "
                                  f"head (fc.weight) has {w.num_classes} classes")
        return w
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return _from_authors(path, obj)
    if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):  # timm's train.py
        obj = obj["state_dict"]
    if _is_state_dict(obj):
        return _from_state_dict(path, obj, "state dict")
    raise CheckpointError(f"{path} is not a checkpoint: no state dict of tensors, no 'model' "
                          f"entry and no pgnm-fast format tag")


def _from_state_dict(path, state, kind, model_name=None, classes=None, meta=None) -> Weights:
    state = strip_prefixes(check_state_dict(state, str(path)))
    check_head(state, path)
    check_finite_weights(state, path)
    if not any(k.startswith(("layer1.", "conv1")) for k in state):
        raise CheckpointError(f"{path} holds no ResNet classifier weights (keys such as "
                              f"{', '.join(list(state)[:3])})")
    return Weights(path, kind, state, model_name or guess_model(state), classes, meta=meta or {})


def _from_authors(path: Path, obj: dict) -> Weights:
    from .models import policy_state_from_authors
    args = obj.get("args")
    name = getattr(args, "model", None) if args is not None else None
    model = check_state_dict(obj["model"], f"{path}: 'model'")
    w = _from_state_dict(path, model, "authors'", name if name in model_names() else None)
    if "policy_net" in obj:
        check_state_dict(obj["policy_net"], f"{path}: 'policy_net'")
        missing = [k for k in ("base_alpha", "base_beta") if k not in obj]
        if missing:
            raise CheckpointError(f"{path}: 'policy_net' comes without {', '.join(missing)}: "
                                  f"not an authors' PGNM checkpoint")
        for key in ("base_alpha", "base_beta"):
            if not isinstance(obj[key], (torch.Tensor, float, int)):
                raise CheckpointError(f"{path}: '{key}' holds a {type(obj[key]).__name__}, "
                                      f"expected a tensor")
        policy = strip_prefixes(policy_state_from_authors(
            dict(obj, policy_net=strip_prefixes(obj["policy_net"]))))
        w.policy = policy
    return w


def _read_folder(path: Path) -> Weights:
    weights, config = path / "model.safetensors", path / "config.json"
    if not weights.is_file():
        bin_file = path / "pytorch_model.bin"
        if not bin_file.is_file():
            raise CheckpointError(f"model folder {path} has no model.safetensors")
        weights = bin_file
    meta = _read_config(config) if config.is_file() else {}
    state = _safetensors_load(weights) if weights.suffix == SAFETENSORS else _torch_load(weights)
    state = check_state_dict(state, str(weights))
    name = str(meta.get("architecture", "")).split(".")[0]  # "resnet50.a1_in1k" -> resnet50
    labels = meta.get("label_names") or meta.get("pretrained_cfg", {}).get("label_names")
    w = _from_state_dict(path, state, "timm folder", name if name in model_names() else None,
                         list(labels) if labels else None, meta)
    if w.classes is not None and "fc.weight" in w.model and len(w.classes) != w.num_classes:
        n = len(w.classes)
        raise CheckpointError(f"{config} has {n} label name{'s' * (n != 1)} ('label_names'), "
                              f"its weights' head (fc.weight) has {w.num_classes} classes")
    return w


def _read_config(config: Path) -> dict:
    """A model folder's ``config.json``, its shape checked: an object whose ``pretrained_cfg``
    is an object, ``label_names`` a list of names and ``architecture`` a name."""
    try:
        meta = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config} holds {json_type(meta)}: expected an object (a timm / "
                              f"Hugging Face model config)")
    cfg = meta.get("pretrained_cfg", {})
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config}: 'pretrained_cfg' is {json_type(cfg)}, expected an "
                              f"object")
    for key, labels in (("label_names", meta.get("label_names")),
                        ("pretrained_cfg.label_names", cfg.get("label_names"))):
        if labels is not None and not (isinstance(labels, list) and
                                       all(isinstance(x, str) for x in labels)):
            raise CheckpointError(f"{config}: '{key}' is {json_type(labels)}, expected a list "
                                  f"of class names")
    if not isinstance(meta.get("architecture", ""), str):
        raise CheckpointError(f"{config}: 'architecture' is {json_type(meta['architecture'])}, "
                              f"expected a model name such as \"resnet50\"")
    return meta


def _reference_shapes(name: str) -> dict:
    with torch.device("meta"):
        model = create_model(name, 10, in_chans=3)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(state: dict, ref: dict) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against a reference, ignoring the head
    and the stem's input channels."""
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    stem = _stem_key(ref, None)
    shaped = [k for k in ref if k in state and not k.startswith("fc.") and (
        tuple(state[k].shape) != ref[k] if k != stem else
        tuple(state[k].shape)[:1] + tuple(state[k].shape)[2:] != ref[k][:1] + ref[k][2:])]
    return missing, unexpected, shaped


def guess_model(state: dict) -> str | None:
    """The model name whose keys and shapes a state dict matches best (None: none is close)."""
    best, best_score = None, 0.0
    for name in model_names():
        ref = _reference_shapes(name)
        missing, unexpected, shaped = _fits(state, ref)
        score = (len(ref) - len(missing) - len(shaped)) / (len(ref) + len(unexpected))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def check_architecture(w: Weights, model_name: str) -> None:
    """Raise naming the first mismatched keys when ``w`` does not fit ``model_name``."""
    ref = _reference_shapes(model_name)
    missing, unexpected, shaped = _fits(w.model, ref)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected or shaped:
        looks = guess_model(w.model)
        like = f"; they look like {looks}" if looks and looks != model_name else ""
        parts = [f"{what} {keys[:3]}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("other shapes", shaped)) if keys]
        raise CheckpointError(f"weights in {w.path} do not fit {model_name}: "
                              f"{', '.join(parts)}{like}")
    check_head(w.model, w.path, ref["fc.weight"][1], model_name)


def resolve_model(w: Weights, requested: str | None) -> str:
    """The architecture: the file's where it carries one (a different --model is an error),
    else ``requested`` (checked against the weights), else the best guess."""
    if w.model_name is not None and w.kind != "state dict":
        if requested is not None and requested != w.model_name:
            raise ConfigError(f"--model {requested} differs from the checkpoint's "
                              f"{w.model_name} in {w.path}")
        check_architecture(w, w.model_name)
        return w.model_name
    name = requested or w.model_name
    if name is None:
        raise CheckpointError(f"cannot tell the architecture of {w.path}: pass --model")
    check_architecture(w, name)
    return name


def fit_classifier(model, w: Weights, model_name: str, classes: list, log,
                   training: bool = True) -> bool:
    """Load ``w`` into ``model`` (a fresh ``model_name`` classifier for ``classes``): a new head
    when the class count or names differ, a summed stem for a 1-channel model fed 3-channel
    weights. Returns True when the stem was summed (see :func:`param_groups`)."""
    check_architecture(w, model_name)
    state, converted = dict(w.model), False
    key = f"{FIRST_CONV[model_name]}.weight"
    target_chans = model.state_dict()[key].shape[1]
    if state[key].shape[1] != target_chans:
        if target_chans != 1:
            raise ConfigError(f"{w.path} has a {state[key].shape[1]}-channel stem; --in-chans "
                              f"{target_chans} needs a 1-channel or {target_chans}-channel one")
        state, converted = convert_to_grey(state, model_name), True
        log(f"{w.path}: {w.in_chans}-channel stem summed to 1 channel (exact for grey images)"
            + (f"; it trains with lr x{STEM_LR_SCALE:g} and weight decay /{STEM_LR_SCALE:g}, the "
               f"3-channel stem's steps (--in-chans 3 keeps 3 channels instead)" if training
               else ""))
    same_head = w.num_classes == len(classes) and (w.classes is None or
                                                   list(w.classes) == list(classes))
    if not same_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        log(f"classes differ from the checkpoint's ({w.num_classes} -> {len(classes)}): "
            f"new classifier head, trunk loaded")
    missing, unexpected = load_weights(model, state, f"weights in {w.path}", strict=same_head)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(f"weights in {w.path} do not fit {model_name}: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
    return converted


def fit_policy(policy, w: Weights, log) -> None:
    """The file's policy into ``policy`` (summing a 3-channel trunk stem for a grey run)."""
    state = dict(w.policy)
    key = f"{POLICY_TRUNK_PREFIX}{FIRST_CONV['resnet10t']}.weight"
    if key in state and state[key].shape[1] != policy.state_dict()[key].shape[1]:
        state = convert_to_grey(state, "policy")
    ours = policy.state_dict()
    wrong = [k for k in ours if k not in state or state[k].shape != ours[k].shape]
    if wrong or set(state) - set(ours):
        raise CheckpointError(f"the policy in {w.path} does not fit this run's policy (--grid "
                              f"{policy.grid}, resnet10t trunk): first mismatched keys "
                              f"{(wrong or sorted(set(state) - set(ours)))[:3]}")
    policy.load_state_dict(state)
    log(f"policy and its base buffers loaded from {w.path}")


# ----------------------------------------------------------------------------------------------
# Out

def export(checkpoint, out, in_chans: int | None = None, fmt: str = "safetensors",
           mean: float | None = None, std: float | None = None, license: str | None = None,
           log=print) -> Path:
    """Write the classifier of ``checkpoint`` (any form :func:`read_weights` reads) to ``out``:
    ``model.safetensors`` + timm ``config.json``, or ``model.pt`` (TorchScript). ``in_chans=3``
    writes a 3-channel stem (the grey stem's weight / 3 per channel: identical logits on a grey
    image replicated to RGB). Beside them, the model card ``README.md``
    (:mod:`pgnm_fast.model_card`); ``license`` (none by default) goes into both."""
    from .model_card import check_license, write_model_card
    from .pipelines import MEAN, STD
    license = check_license(license)
    if fmt not in ("safetensors", "torchscript"):
        raise ConfigError(f"--format must be safetensors or torchscript, not {fmt!r}")
    w = read_weights(checkpoint)
    name = resolve_model(w, None)
    in_chans = in_chans or w.in_chans or 1
    model = _export_model(w, name, in_chans)
    cfg = w.state.train_config if w.state is not None else None
    mean = mean if mean is not None else (cfg.mean if cfg is not None and cfg.mean is not None else MEAN)
    std = std if std is not None else (cfg.std if cfg is not None and cfg.std is not None else STD)
    crop, resize = (cfg.val_crop_size, cfg.val_resize_size) if cfg is not None else (224, 256)
    classes = w.classes or [str(i) for i in range(w.num_classes)]
    card = dict(architecture=name, classes=classes, in_chans=in_chans, crop=crop, resize=resize,
                mean=float(mean), std=float(std), format=fmt, license=license)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with atomic_open(out / "model.pt", "wb") as f:
            torch.jit.save(torch.jit.script(model), f)
        written = f"{out / 'model.pt'} and the model card {out / 'README.md'} (TorchScript {name}"
    else:
        from safetensors.torch import save
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_open(out / "model.safetensors", "wb") as f:
            f.write(save(tensors, metadata={"format": "pt"}))
        with atomic_open(out / "config.json", "w") as f:
            json.dump(_timm_config(card, model, w.num_classes), f, indent=2)
            f.write("\n")
        written = (f"{out / 'model.safetensors'}, {out / 'config.json'} and the model card "
                   f"{out / 'README.md'} ({name}, {w.num_classes} classes")
    write_model_card(out, card, w.state, w.kind)
    log(f"wrote {written}, {in_chans}-channel input)")
    return out


def _export_model(w: Weights, name: str, in_chans: int) -> torch.nn.Module:
    """The classifier of ``w`` with an ``in_chans``-channel stem, in eval mode; non-finite
    weights are refused (never exported)."""
    state, chans = dict(w.model), w.in_chans or 1
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"weights in {w.path}: {bad} is not finite (NaN or inf): "
                              f"non-finite weights are never exported")
    key = f"{FIRST_CONV[name]}.weight"
    if in_chans != chans:
        if chans == 1 and in_chans == 3:
            state[key] = (state[key].float() / 3).repeat(1, 3, 1, 1).to(state[key].dtype)
        elif in_chans == 1:
            state = convert_to_grey(state, name)
        else:
            raise ConfigError(f"--in-chans must be 1 or 3, not {in_chans}")
    model = create_model(name, w.num_classes, in_chans=in_chans)
    model.load_state_dict(state)
    return model.eval()


def _timm_config(card: dict, model: torch.nn.Module, num_classes: int) -> dict:
    """timm's ``config.json`` of an export (``card``: its architecture, input and classes)."""
    chans, crop = card["in_chans"], card["crop"]
    config = {
        "architecture": card["architecture"], "num_classes": num_classes,
        "num_features": model.num_features, "global_pool": "avg", "model_args": {"in_chans": chans},
        "pretrained_cfg": {
            "input_size": [chans, crop, crop], "interpolation": "bilinear",
            "crop_pct": round(crop / card["resize"], 4), "crop_mode": "center",
            "mean": [card["mean"]] * chans, "std": [card["std"]] * chans,
            "num_classes": num_classes, "first_conv": FIRST_CONV[card["architecture"]],
            "classifier": "fc", "fixed_input_size": False},
        "label_names": list(card["classes"]),
    }
    if card["license"]:
        config["pretrained_cfg"]["license"] = card["license"]
    return config


__all__ = ["Weights", "read_weights", "fit_classifier", "fit_policy", "resolve_model",
           "guess_model", "check_architecture", "export", "strip_prefixes"]
