"""The command-line options of the training settings, built from :class:`TrainConfig`'s field
metadata (one list for `train`, `finetune`, `compare` and ``docs/flags.md``), and ``--config``
files: YAML or JSON with the same keys as the settings, which is also what a run writes to
``RUN/config.json``. Flags given on the command line win over the file, the file over the preset.

``python -m pgnm_fast.options --flags-md > docs/flags.md`` writes the flags table.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from pathlib import Path

import click
from click.core import ParameterSource

from .config import CROP_RATIO, FIELDS, PRESETS, TrainConfig, check_value, rule_of
from .config import meta as field_meta
from .errors import ConfigError
from .names import DEVICES

TYPES = typing.get_type_hints(TrainConfig)
CROPS = ("train_crop_size", "val_crop_size", "val_resize_size")
# keys a --config file may hold besides the settings; ``run_record`` (written by a run) is ignored
RUN_KEYS = {"data": str, "out": str, "preset": str, "device": str, "recheck": bool, "img_size": int}
IGNORED_KEYS = ("run_record",)
DATA_HELP = ("RadImageNet root (CSV splits), class-folder root, a cache made by `pgnm-fast pack` "
             "or a MedMNIST .npz file; default: the embedded synthetic data set (made once in a "
             "cache folder).")
IMG_SIZE_HELP = (f"Train crop N, val crop N and val resize round(N / {CROP_RATIO}); an explicit "
                 "crop flag wins.")


class Option(click.Option):
    """An option whose ``show_default`` text shows as ``[default: text]`` (click adds brackets)."""

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


def base_type(name: str) -> type:
    """``int`` for ``int``, ``float`` for ``float | None``."""
    args = [a for a in typing.get_args(TYPES[name]) if a is not type(None)]
    return args[0] if args else TYPES[name]


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def default_text(name: str, stage: str) -> str:
    """The default of a setting for ``stage`` as help shows it: one value, or the tiny and paper
    presets' when they differ."""
    meta = field_meta(name)
    if meta["default_text"]:
        return meta["default_text"]
    values = [PRESETS[p][stage].get(name, FIELDS[name].default) for p in ("tiny", "paper")]
    if values[0] == values[1]:
        return _shown(values[0])
    return f"tiny {_shown(values[0])}, paper {_shown(values[1])}"


def option_names(name: str) -> tuple[str, ...]:
    meta = field_meta(name)
    flags = meta["flags"] or ("--" + name.replace("_", "-"),)
    if base_type(name) is bool and not meta["flags"]:
        return (f"{flags[0]}/--no-{flags[0][2:]}",)
    return flags


def _to_int(ctx, param, value):
    return None if value is None else int(value)


def checked(rule: str, name: str | None = None):
    """An option callback: one line naming the option (or ``name``) when its value breaks
    ``rule`` (:data:`pgnm_fast.config.RULES`, the settings' own rules)."""
    def callback(ctx, param, value):
        check_value(name or "/".join(param.opts), value, rule)
        return value
    return callback


def not_empty(ctx, param, value):
    if value is not None and not str(value).strip():
        raise ConfigError(f"{param.opts[0]} needs a folder name, not an empty one")
    return value


def setting_option(name: str, stage: str, help: str | None = None, shown: str | None = None):
    """The click option of the setting ``name``; its default None means "the preset's"."""
    meta = field_meta(name)
    kind = base_type(name)
    kw = dict(default=None, help=help or meta["help"], metavar=meta["metavar"],
              show_default=shown or default_text(name, stage))
    if meta["rule"]:
        kw["callback"] = checked(meta["rule"])
    if kind is bool:
        if meta["flags"]:  # named flags (--compile, --torchcompile) have no --no- form
            kw["is_flag"] = True
    elif meta["choices"]:
        kw["type"] = click.Choice(meta["choices"])
        if kind is int:
            kw["callback"] = _to_int
    else:
        kw["type"] = kind
    return click.option(*option_names(name), name, cls=Option, **kw)


def settings_options(names, stage: str = "heated", helps: dict | None = None,
                     defaults: dict | None = None) -> list:
    """The options of the settings ``names`` for another command, with its own help or default
    text where ``helps`` / ``defaults`` give one."""
    helps, defaults = helps or {}, defaults or {}
    return [setting_option(n, stage, helps.get(n), defaults.get(n)) for n in names]


def compose(options: list):
    """Decorator applying ``options`` in order (the first shows first in --help)."""
    return lambda f: functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def setting_names(stage: str) -> list[str]:
    """The settings with a flag in `train` (heated) or `finetune`, in the dataclass's order."""
    return [n for n in FIELDS if field_meta(n)["cli"]
            and not (stage == "finetune" and field_meta(n)["heated_only"])]


def run_options(out_help: str) -> list:
    """The options every training command shares that are not settings."""
    return [
        click.option("--data", "--data-path", "data", type=str, default=None, help=DATA_HELP),
        click.option("--out", "--output-dir", "out", type=str, default=None, help=out_help,
                     callback=not_empty),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny",
                     help="tiny: minutes on a CPU; paper: the authors' schedules."),
        click.option("--device", type=click.Choice(DEVICES), default="auto",
                     help="auto: CUDA where available, else the CPU."),
        img_size_option("the preset's crops"),
    ]


def img_size_option(default: str):
    return click.option("--img-size", type=int, default=None, metavar="N", help=IMG_SIZE_HELP,
                        cls=Option, show_default=default, callback=checked("positive"))


def config_options() -> list:
    return [
        click.option("--config", "config_file", type=str, default=None, metavar="FILE",
                     help="YAML or JSON file of settings (the keys of docs/flags.md, or a run's "
                          "config.json); flags given here win over it."),
        click.option("--print-config", is_flag=True,
                     help="Print the resolved settings as YAML (a --config file) and exit; with "
                          "--resume, the checkpoint's settings and the flags given (the model "
                          "and input form of --from / --initial-checkpoint weights apply when "
                          "the run starts)."),
    ]


def training_options(stage: str):
    """Decorator: the options of `train` (``stage`` heated) or `finetune`."""
    out_help = "Run folder for last.pt, best.pt, metrics.jsonl (default runs/<stage>-<time>)."
    options = run_options(out_help) + [
        click.option("--recheck", is_flag=True,
                     help="Check every image file afresh instead of reusing the verdict cached "
                          "beside the data.")]
    options += [setting_option(n, stage) for n in setting_names(stage)] + config_options()
    return compose(options)


def read_config_file(path: str) -> dict:
    """The keys of a YAML or JSON ``--config`` file (JSON is YAML), checked: one line naming
    the file and the first unknown key or bad value."""
    import yaml
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not YAML or JSON ({str(e).splitlines()[0]})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, not "
                          f"{type(values).__name__}")
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in IGNORED_KEYS:
            continue
        checked[name] = _checked_value(path, name, value)
    return checked


def _checked_value(path: str, name: str, value):
    """``value`` of the key ``name`` in the file ``path``, of the setting's type (an int where a
    float is wanted becomes one), among its choices and in its range."""
    if name in RUN_KEYS:
        kind, optional = RUN_KEYS[name], True
        choices = {"preset": tuple(PRESETS), "device": DEVICES}.get(name)
        rule = "positive" if name == "img_size" else None
    elif name in FIELDS:
        kind, choices, rule = base_type(name), field_meta(name)["choices"], rule_of(name)
        optional = type(None) in typing.get_args(TYPES[name])
    else:
        raise ConfigError(f"--config {path}: unknown key {name!r} (the keys are the settings "
                          f"listed in docs/flags.md)")
    where = f"--config {path}: {name}"
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and choices and isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not kind:
        raise ConfigError(f"{where} must be {kind.__name__}, not {value!r}")
    if choices and str(value) not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if rule:
        check_value(where, value, rule)
    return value


def given(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` was given on the command line (or in the environment)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT,
                                                  ParameterSource.DEFAULT_MAP)


def resolve(ctx: click.Context, values: dict) -> dict:
    """The command's option ``values`` with a ``--config`` file's beneath those given on the
    command line; ``--img-size`` expanded into the crops it does not override."""
    path = values.pop("config_file", None)
    from_file = read_config_file(path) if path else {}
    merged = dict(values)
    for name, value in from_file.items():
        if name not in merged or not given(ctx, name):
            merged[name] = value
    file_size = from_file.get("img_size")
    cli_size = values.get("img_size") if given(ctx, "img_size") else None
    for size, wins in ((file_size, lambda n: n in from_file), (cli_size, lambda n: False)):
        if size is None:
            continue
        for name in CROPS:
            if not (given(ctx, name) or wins(name)):
                merged[name] = round(size / CROP_RATIO) if name == "val_resize_size" else size
    merged.pop("img_size", None)
    return merged


def split_run(values: dict, run_keys=("data", "out", "preset", "device", "recheck")):
    """``(run arguments, setting overrides)``: the keys of run_stage and the TrainConfig ones."""
    run = {k: values.pop(k) for k in run_keys if k in values}
    return run, values


def echo_config(cfg: TrainConfig, data=None, world_size: int = 1) -> None:
    """The resolved settings as YAML that ``--config`` reads back, after a comment line with the
    global batch, its accumulation and the lr per image (:func:`pgnm_fast.batching.batch_line`)."""
    import yaml

    from .batching import batch_line
    record = dataclasses.asdict(cfg)
    if data is not None:
        record["data"] = str(data)
    click.echo(f"# {batch_line(cfg, world_size)}")
    click.echo(yaml.safe_dump(record, sort_keys=False), nl=False)


def flags_markdown() -> str:
    """``docs/flags.md``: every setting with its flag, key, defaults and help."""
    lines = ["<!-- Generated by `python -m pgnm_fast.options --flags-md > docs/flags.md` from "
             "the field metadata of pgnm_fast/config.py: edit those, then regenerate. -->",
             "", "# Flags", "",
             "The settings of `pgnm-fast train` and `pgnm-fast finetune` (and the ones `compare` "
             "passes on). Each is a flag and a key of a `--config` file (YAML or JSON; a run's "
             "`config.json` is one). Flags given on the command line win over the file, the "
             "file over the `--preset`. Defaults differ between presets where two are shown; "
             "`finetune` column: where the fine-tune stage's default differs.", "",
             "| Flag | Key | Default | finetune | Meaning |", "|---|---|---|---|---|"]
    for name in FIELDS:
        meta = field_meta(name)
        flag = " ".join(f"`{f}`" for f in option_names(name)) if meta["cli"] else "(file only)"
        train, finetune = default_text(name, "heated"), default_text(name, "finetune")
        if meta["heated_only"]:
            finetune = "(train only)"
        cell = "" if finetune == train else finetune
        lines.append(f"| {flag} | `{name}` | {train} | {cell} | {meta['help']} |")
    lines += ["", "Other keys of a `--config` file: `data` (used when `--data` is not given), "
              "`out`, `preset`, `device`, `recheck`, `img_size` (the flags of the same names); "
              "`run_record`, which a run writes to its `config.json`, is ignored. `stage` must "
              "match the command: `train` takes heated (baseline: as `--no-policy`), `finetune` "
              "takes finetune.", "",
              f"`--img-size N` sets the train crop N, the val crop N and the val resize "
              f"round(N / {CROP_RATIO}); an explicit crop flag (or crop key beside `img_size` in "
              f"a file) wins.", "",
              "`pgnm-fast train --config RUN/config.json` trains again with a run's settings "
              "and data; `--print-config` prints the settings a command line resolves to, as "
              "YAML that `--config` reads, and exits.", "",
              "`--data` (alias `--data-path`, torchvision's name) takes a data folder, a packed "
              "cache or a MedMNIST `.npz` file, in every command that reads data.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--flags-md"]:
        sys.exit("usage: python -m pgnm_fast.options --flags-md > docs/flags.md")
    sys.stdout.write(flags_markdown())
