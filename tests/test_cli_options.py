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


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_option_has_help_and_its_default_shows(command):
    ctx = click.Context(main.commands[command], info_name=command, parent=click.Context(main),
                        show_default=True)
    for param in main.commands[command].params:
        if not isinstance(param, click.Option):
            continue
        assert param.help and param.help.strip(), f"{command} {param.opts[0]} has no help"
        record = param.get_help_record(ctx)[1]
        default = param.get_default(ctx, call=False)
        has_default = not (param.required or param.multiple) and default not in (None, False)
        if has_default or isinstance(param.show_default, str):
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


EXECUTION = {"--threads", "-j", "--device", "--amp", "--loader", "--img-size", "--val-crop-size",
             "--val-resize-size"}


@pytest.mark.parametrize("command", ["train", "finetune", "compare", "transfer", "eval"])
def test_every_command_that_trains_or_scores_takes_the_execution_flags(command):
    opts = {o for p in main.commands[command].params for o in p.opts}
    assert EXECUTION <= opts, EXECUTION - opts
    assert command == "eval" or "--train-crop-size" in opts


def test_data_path_is_an_alias_of_data_everywhere():
    for name, command in main.commands.items():
        for param in command.params:
            if "--data" in param.opts:
                assert "--data-path" in param.opts, name


def test_eval_passes_threads_sizes_and_loader_and_says_how_many_threads(monkeypatch):
    import pgnm_fast.evaluate
    import pgnm_fast.metrics
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        return {}

    monkeypatch.setattr(pgnm_fast.evaluate, "evaluate_checkpoint", fake)
    monkeypatch.setattr(pgnm_fast.metrics, "format_metrics", lambda m: "ok")
    r = cli("eval", "--checkpoint", "x.pt", "--device", "cpu", "--threads", "1", "--img-size",
            "64", "--val-crop-size", "56", "--loader", "torch")
    assert r.exit_code == 0, r.output
    assert "1 intra-op thread (--threads)" in r.output
    assert seen["sizes"] == {"val_crop_size": 56, "val_resize_size": 73}
    assert seen["loader"] == "torch"
    r = cli("eval", "--checkpoint", "x.pt", "--device", "cpu")
    assert r.exit_code == 0 and "intra-op thread" in r.output and "busy" in r.output, r.output
    assert seen["sizes"] == {} and seen["loader"] is None


def test_compare_and_transfer_pass_the_execution_flags_on(monkeypatch):
    import pgnm_fast.compare
    import pgnm_fast.transfer
    seen = {}
    monkeypatch.setattr(pgnm_fast.compare, "compare", lambda *a, **kw: seen.update(compare=kw))
    monkeypatch.setattr(pgnm_fast.transfer, "transfer", lambda *a, **kw: seen.update(transfer=kw))
    r = cli("compare", "--threads", "1", "--img-size", "32", "--loader", "torch", "-j", "0")
    assert r.exit_code == 0, r.output
    for overrides in (seen["compare"]["overrides"], seen["compare"]["finetune_overrides"]):
        assert (overrides["threads"], overrides["train_crop_size"], overrides["val_crop_size"],
                overrides["val_resize_size"], overrides["loader"], overrides["workers"]) == (
            1, 32, 32, 37, "torch", 0)
    r = cli("transfer", "--from", "a.pt", "--data", "d", "--threads", "1", "--device", "cpu",
            "--train-crop-size", "40", "--img-size", "32")
    assert r.exit_code == 0, r.output
    assert "1 intra-op thread (--threads)" in r.output
    assert seen["transfer"]["sizes"] == {"train_crop_size": 40, "val_crop_size": 32,
                                         "val_resize_size": 37}


BAD_NUMBERS = [
    (["transfer", "--from", "a.pt", "--data", "d", "--lr", "nan"], "--lr"),
    (["transfer", "--from", "a.pt", "--data", "d", "--lr", "-1"], "--lr"),
    (["transfer", "--from", "a.pt", "--data", "d", "--shots", "0,4"], "--shots"),
    (["transfer", "--from", "a.pt", "--data", "d", "--repeats", "0"], "--repeats"),
    (["transfer", "--from", "a.pt", "--data", "d", "--steps", "0"], "--steps"),
    (["transfer", "--from", "a.pt", "--data", "d", "-b", "1"], "--batch-size"),
    (["transfer", "--from", "a.pt", "--data", "d", "--seed", "-1"], "--seed"),
    (["transfer", "--from", "a.pt", "--data", "d", "--threads", "-1"], "--threads"),
    (["transfer", "--from", "a.pt", "--data", "d", "--img-size", "0"], "--img-size"),
    (["eval", "--checkpoint", "x.pt", "-b", "0"], "--batch-size"),
    (["eval", "--checkpoint", "x.pt", "--threads", "-2"], "--threads"),
    (["eval", "--checkpoint", "x.pt", "--val-crop-size", "0"], "--val-crop-size"),
    (["compare", "--seeds", "0"], "--seeds"), (["compare", "--seed", "-3"], "--seed"),
    (["compare", "--threads", "-1"], "--threads"), (["compare", "--lr-nope", "1"], "--lr-nope"),
    (["compare", "--finetune-epochs", "0"], "--finetune-epochs"),
    (["train", "--lr", "inf", "--print-config"], "--lr"),
    (["train", "--img-size", "-4", "--print-config"], "--img-size"),
    (["validate", "--seed", "-1"], "--seed"), (["pack", "-j", "-1"], "--workers"),
]


@pytest.mark.parametrize("args,flag", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_numeric_flags_are_checked_up_front(args, flag, monkeypatch):
    import pgnm_fast.compare
    import pgnm_fast.transfer
    monkeypatch.setattr(pgnm_fast.compare, "compare", lambda *a, **kw: pytest.fail("ran"))
    monkeypatch.setattr(pgnm_fast.transfer, "transfer", lambda *a, **kw: pytest.fail("ran"))
    one_error(cli(*args), flag)


@pytest.mark.parametrize("args", [["train"], ["finetune", "--from", "x.pt"], ["compare"],
                                  ["transfer", "--from", "a.pt", "--data", "d"], ["synth"],
                                  ["pack", "--data", "d"], ["export", "x.pt"]])
def test_an_empty_out_is_refused(args):
    one_error(cli(*args, "--out", ""), "--out")
