"""What `pgnm-fast compare` is told beyond the shared settings: per-stage settings
(``--stage-set heated.lr=0.0125``, ``--heated-lr`` ...) and the weights both arms start from
(``--initial-checkpoint``).

A stage setting names a stage (``heated``, ``finetune``, ``baseline``) and a
:class:`~pgnm_fast.config.TrainConfig` field; its value is read with the field's type (``none``
for a setting that may be unset, ``true`` / ``false`` for a switch) and checked with the field's
range rule and choices, so a mistake is one line naming the ``--stage-set`` entry. It wins over
the shared flags for that stage alone.
"""
from __future__ import annotations

from .config import FIELDS, STAGES, check_value, meta
from .errors import ConfigError

# set by compare itself: the stage, each seed's seed, the fine-tune's classifier (the heated one)
NOT_SETTABLE = {"stage": "it is the stage's name", "seed": "--seed and --seeds set it"}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _value(entry: str, key: str, text: str):
    kind = str(FIELDS[key].type)
    if text.lower() == "none" and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() not in TRUE + FALSE:
            raise ConfigError(f"--stage-set {entry}: {key} is a switch: true or false, not "
                              f"{text!r}")
        return text.lower() in TRUE
    for name, cast in (("int", int), ("float", float)):
        if kind.startswith(name):
            try:
                return cast(text)
            except ValueError:
                raise ConfigError(f"--stage-set {entry}: {key} takes a number ({name}), not "
                                  f"{text!r}") from None
    return text


def parse_stage_set(entry: str) -> tuple[str, str, object]:
    """``"heated.lr=0.0125"`` -> ``("heated", "lr", 0.0125)``, checked (module docstring)."""
    name, eq, text = entry.partition("=")
    stage, dot, key = name.strip().partition(".")
    if not eq or not dot:
        raise ConfigError(f"--stage-set {entry!r}: write STAGE.SETTING=VALUE, e.g. "
                          f"heated.lr=0.0125")
    if stage not in STAGES:
        raise ConfigError(f"--stage-set {entry}: no stage {stage!r} (choose from "
                          f"{', '.join(STAGES)})")
    if key not in FIELDS:
        raise ConfigError(f"--stage-set {entry}: {key!r} is not a setting (the keys of "
                          f"docs/flags.md, with _ for -)")
    if key in NOT_SETTABLE or (stage == "finetune" and key == "model"):
        why = NOT_SETTABLE.get(key, "the fine-tune keeps the heated classifier")
        raise ConfigError(f"--stage-set {entry}: {key} is not set per stage ({why})")
    field = meta(key)
    if field["heated_only"] and stage != "heated":
        raise ConfigError(f"--stage-set {entry}: {key} is a setting of the heated stage's policy; "
                          f"the {stage} stage has none")
    value = _value(entry, key, text.strip())
    if field["rule"]:
        check_value(f"--stage-set {entry}: {key}", value, field["rule"])
    choices = field["choices"]
    if choices and value is not None and str(value) not in choices:
        raise ConfigError(f"--stage-set {entry}: {key} must be one of {', '.join(choices)}, "
                          f"not {value!r}")
    if key == "channels":
        value = int(value)
    return stage, key, value


def stage_sets(entries=(), heated_lr=None, finetune_lr=None, baseline_lr=None) -> dict:
    """``{stage: {setting: value}}`` of the ``--stage-set`` entries and the ``--<stage>-lr``
    flags (a flag and an entry for the same stage's lr must agree)."""
    sets: dict = {stage: {} for stage in STAGES}
    for entry in entries:
        stage, key, value = parse_stage_set(entry)
        if key in sets[stage] and sets[stage][key] != value:
            raise ConfigError(f"--stage-set sets {stage}.{key} twice ({sets[stage][key]!r} and "
                              f"{value!r})")
        sets[stage][key] = value
    for stage, lr in (("heated", heated_lr), ("finetune", finetune_lr), ("baseline", baseline_lr)):
        if lr is None:
            continue
        check_value(f"--{stage}-lr", lr, "positive")
        if sets[stage].get("lr", lr) != lr:
            raise ConfigError(f"--{stage}-lr {lr} and --stage-set {stage}.lr="
                              f"{sets[stage]['lr']} disagree: give one")
        sets[stage]["lr"] = lr
    return sets


def start_overrides(weights, overrides: dict) -> dict:
    """The settings a run from ``weights`` (:class:`pgnm_fast.weights.Weights`) takes from them,
    as :func:`pgnm_fast.prepare.prepare_run` sets them: the architecture, and for a pgnm-fast
    checkpoint its channels and normalisation, then the stems' lr scales. The flags given
    (``overrides``) win."""
    from .optim import stem_lr_scales
    from .weights import resolve_model
    given = {k: v for k, v in overrides.items() if v is not None}
    extra = {"model": resolve_model(weights, given.get("model"))}
    if weights.state is not None:
        saved = weights.state.train_config
        extra["channels"] = weights.state.in_chans
        extra.update({k: getattr(saved, k) for k in ("mean", "std")
                      if getattr(saved, k) is not None})
    extra.update(stem_lr_scales(weights, given.get("channels", extra.get("channels", 1))))
    return {**extra, **given}
