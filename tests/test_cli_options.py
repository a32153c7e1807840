"""The command line: options built from the settings' metadata, help on every option, the
generated docs/flags.md, --config / --print-config, --img-size, --data-path."""
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.config import FIELDS, make_config
from pgnm_fast.options import flags_markdown

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error(result, *needles):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert str(needle) in lines[0], result.output
    return lines[0]


def test_docs_flags_table_is_generated_from_the_settings():
    assert (ROOT / "docs" / "flags.md").read_text() == flags_markdown(), (
        "docs/flags.md is out of date: python -m pgnm_fast.options --flags-md > docs/flags.md")


def test_every_setting_with_a_flag_is_an_option_of_train():
    params = {p.name: p for p in main.commands["train"].params}
    for name, field in FIELDS.items():
        assert (name in params) == field.metadata["cli"], name
    finetune = {p.name for p in main.commands["finetune"].params}
    assert {"grid", "impl", "policy_lr", "policy_model"}.isdisjoint(finetune)
    # the names users know: torchvision's and timm's spellings and short forms
    opts = {o for p in params.values() for o in p.opts}
    assert {"--wd", "--weight-decay", "-j", "--workers", "-b", "--in-chans", "--torchcompile",
            "--data-path", "--output-dir"} <= opts
    assert params["amp"].secondary_opts == ["--no-amp"] and params["compile"].secondary_opts == []


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_every_option_has_help_and_its_default_shows(command):
    ctx = click.Context(main.commands[command], info_name=command, parent=click.Context(main),
                        show_default=True)
    for param in main.commands[command].params:
        if not isinstance(param, click.Option):
            continue
        assert param.help and param.help.strip(), f"{command} {param.opts[0]} has no help"
        record = param.get_help_record(ctx)[1]
        default = param.get_default(ctx, call=False)
        if (not param.required and default not in (None, False, ())) or isinstance(param.show_default, str):
            assert "[default: " in record, f"{command} {param.opts[0]} hides its default"


def test_help_shows_the_presets_defaults():
    text = cli("train", "--help").output
    assert "[default: tiny 6, paper 90]" in " ".join(text.split())
    text = cli("finetune", "--help").output
    assert "[default: tiny 2, paper 10]" in " ".join(text.split())


def test_print_config_resolves_flags_over_the_preset():
    r = cli("train", "--print-config", "--wd", "3e-4", "--no-amp", "-j", "0")
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output)
    assert printed == make_config("heated", "tiny", weight_decay=3e-4, amp=False,
                                  workers=0).__dict__
