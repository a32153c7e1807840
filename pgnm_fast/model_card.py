"""The model card (``README.md``) that ``pgnm-fast export`` writes beside the weights: what the
model is (architecture, input, classes), what it was trained on and how far (data, stage, epochs),
how it scored on validation, how to load it with timm, and under which terms it may be used.

The card is Markdown with the YAML front matter model hubs read (``library_name``, ``tags``,
``license``). No licence is claimed unless one is given: weights trained on someone's data fall
under that data owner's terms, which the card says whatever the licence.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import __version__
from .atomic import atomic_open
from .errors import ConfigError
from .metrics import METRIC_KEYS
from .run_state import RunState

LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")  # an SPDX identifier, or hub ids such as "other"
STAGES = {
    "heated": "heated: trained on images multiplied by the PGNM policy's noise masks (the policy "
              "is not part of these weights)",
    "finetune": "fine-tuned: a heated (or baseline) classifier trained further without masks",
    "baseline": "baseline: trained without masks",
}
SOURCES = {"state dict": "a plain state dict", "timm folder": "a timm model folder",
           "authors'": "a checkpoint of the authors' code"}
MAX_CLASSES = 200  # more are counted, not listed


def check_license(license: str | None) -> str | None:
    """``--license``: None, or an identifier that fits one line of the card's front matter."""
    if license is None:
        return None
    if not LICENSE.fullmatch(license):
        raise ConfigError(f"--license must be a licence identifier such as apache-2.0 or "
                          f"cc-by-nc-4.0, not {license!r}")
    return license.lower()


def _front_matter(license: str | None) -> list[str]:
    lines = ["---", "library_name: timm", "tags:", "- image-classification", "- timm",
             "- pgnm-fast", "- medical-imaging"]
    if license:
        lines.append(f"license: {license}")
    return lines + ["---", ""]


def _training(state: RunState | None, kind: str) -> list[str]:
    if state is None:
        source = SOURCES.get(kind, kind)
        return ["## Training", "", f"Exported from {source}, which does not record how the "
                "weights were trained.", ""]
    cfg, stage = state.train_config, state.stage
    epochs = f"{state.epoch + 1} of {cfg.epochs}"
    data = Path(state.data).name if state.data else "not recorded"
    return ["## Training", "",
            f"- Data: `{data}` (the data folder's name)",
            f"- Stage: {STAGES.get(stage, stage)}",
            f"- Epochs: {epochs}; global batch {cfg.global_batch} ({cfg.batch_size} per "
            f"process), "
            f"lr {cfg.lr} ({cfg.lr_scheduler}), optimiser {cfg.opt}",
            f"- Trained with pgnm-fast (this card: pgnm-fast {__version__})", ""]


def _metrics(state: RunState | None) -> list[str]:
    scores = state.val_metrics if state is not None else None
    if not scores:
        return []
    masked = " (with the policy's masks: the heated stage's validation)" \
        if state.stage == "heated" else ""
    lines = ["## Validation metrics", "",
             f"On the validation split after epoch {state.epoch + 1}{masked}:", "",
             "| metric | value |", "|---|---|"]
    for key in METRIC_KEYS:
        value = scores.get(key)
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4f} |" if value == value else f"| {key} | n/a |")
        elif isinstance(value, int):
            lines.append(f"| {key} | {value} |")
    return lines + [""]


def _loading(spec: dict) -> list[str]:
    if spec["format"] == "torchscript":
        return ["## Loading", "", "```python", "import torch", "",
                'model = torch.jit.load("model.pt").eval()', "```", ""]
    chans, crop = spec["in_chans"], spec["crop"]
    overlay = (f'dict(file="path/to/this/folder/model.safetensors", num_classes={len(spec["classes"])}, '
               f'input_size=({chans}, {crop}, {crop}))')
    return ["## Loading", "",
            "With timm, from this folder (it reads `config.json`: architecture, classes, input "
            "channels, preprocessing):", "", "```python", "import timm", "",
            'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()',
            "```", "",
            "or from the weights file, by architecture name:", "", "```python", "import timm", "",
            f'model = timm.create_model("{spec["architecture"]}", pretrained=True, '
            f'num_classes={len(spec["classes"])}, in_chans={chans},',
            f"                          pretrained_cfg_overlay={overlay}).eval()", "```", ""]


def model_card(spec: dict, state: RunState | None = None, kind: str = "pgnm-fast") -> str:
    """The card's text. ``spec``: architecture, classes, in_chans, crop, resize, mean, std,
    format and license of the export; ``state``: the pgnm-fast checkpoint, if it was one."""
    classes, chans = list(spec["classes"]), spec["in_chans"]
    listed = ", ".join(f"`{c}`" for c in classes[:MAX_CLASSES])
    more = f" and {len(classes) - MAX_CLASSES} more" if len(classes) > MAX_CLASSES else ""
    colour = "grey (1 channel)" if chans == 1 else f"{chans} channels (a grey image replicated)"
    licence = (f"Released under `{spec['license']}`." if spec.get("license") else
               "No licence was given when these weights were exported.")
    lines = _front_matter(spec.get("license")) + [
        f"# {spec['architecture']}, {len(classes)} classes", "",
        "An image classifier exported by pgnm-fast (Policy Gradient-Driven Noise Mask "
        "pretraining, arXiv 2406.14568).", "",
        "## Model", "",
        f"- Architecture: timm `{spec['architecture']}`",
        f"- Input: {colour}, {spec['crop']} x {spec['crop']} (resize {spec['resize']}, centre "
        f"crop), pixels in [0, 1] normalised with mean {spec['mean']:g}, std {spec['std']:g}",
        f"- Classes ({len(classes)}, in output order): {listed}{more}", ""]
    lines += _training(state, kind) + _metrics(state) + _loading(spec)
    lines += ["## Terms of use", "", licence,
              "Weights trained on a data set carry that data set's terms: the data owner's terms "
              "of use apply to these weights and to what is built from them, whatever licence is "
              "given here.", ""]
    return "\n".join(lines)


def write_model_card(out: Path, spec: dict, state: RunState | None = None,
                     kind: str = "pgnm-fast") -> Path:
    """Write ``out/README.md`` atomically; returns its path."""
    path = Path(out) / "README.md"
    with atomic_open(path, "w") as f:
        f.write(model_card(spec, state, kind))
    return path


__all__ = ["check_license", "model_card", "write_model_card"]
