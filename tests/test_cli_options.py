"""The command line: options built from the settings' metadata, help on every option, the
generated docs/flags.md, --config / --print-config, --img-size, --data-path."""
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.config import FIELDS, make_config, meta
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


def test_every_setting_is_declared_with_its_help():
    for name, field in FIELDS.items():
        assert field.metadata.get("help"), (
            f"TrainConfig.{name}: declare it with setting(default, help, ...) (cli=False: no flag)")


def test_every_setting_with_a_flag_is_an_option_of_train():
    params = {p.name: p for p in main.commands["train"].params}
    for name in FIELDS:
        assert (name in params) == meta(name)["cli"], name
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
    monkeypatch.setattr(pgnm_fast.transfer, "transfer",
                        lambda *a, **kw: (seen.update(transfer=kw), kw["log"]("transfer: ...")))
    r = cli("compare", "--threads", "1", "--img-size", "32", "--loader", "torch", "-j", "0")
    assert r.exit_code == 0, r.output
    for overrides in (seen["compare"]["overrides"], seen["compare"]["finetune_overrides"]):
        assert (overrides["threads"], overrides["train_crop_size"], overrides["val_crop_size"],
                overrides["val_resize_size"], overrides["loader"], overrides["workers"]) == (
            1, 32, 32, 37, "torch", 0)
    r = cli("transfer", "--from", "a.pt", "--data", "d", "--threads", "1", "--device", "cpu",
            "--train-crop-size", "40", "--img-size", "32")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:2] == ["1 intra-op thread (--threads)", "transfer: ..."]
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


@pytest.mark.slow
def test_a_runs_config_json_round_trips_through_config(small_data, tmp_path):
    """`train --config RUN/config.json` resolves to the run's settings and data; flags win."""
    import json
    out = tmp_path / "run"
    r = cli("train", "--no-policy", "--data", small_data, "--out", out, "--epochs", "1", "-b", "16",
            "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32", "-j", "0",
            "--loader", "torch", "--wd", "3e-4", "--threads", "1")
    assert r.exit_code == 0, r.output
    written = json.loads((out / "config.json").read_text())
    written.pop("run_record")
    r = cli("train", "--config", out / "config.json", "--print-config")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output) == written  # stage baseline, data, every setting
    r = cli("train", "--config", out / "config.json", "--print-config", "--lr", "0.5",
            "--img-size", "40", "--data-path", tmp_path)
    resolved = yaml.safe_load(r.output)
    assert (resolved["lr"], resolved["data"], resolved["weight_decay"]) == (0.5, str(tmp_path), 3e-4)
    assert (resolved["train_crop_size"], resolved["val_crop_size"],
            resolved["val_resize_size"]) == (40, 40, 46)
    r = cli("train", "--no-policy", "--resume", out / "last.pt", "--epochs", "3", "--print-config")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output) == dict(written, epochs=3)  # the checkpoint's, then the flags
    r = cli("eval", "--checkpoint", out / "last.pt", "--split", "val", "-j", "0", "--threads", "1",
            "--img-size", "40", "--loader", "torch", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("1 intra-op thread (--threads)") and "val: " in r.output, r.output


def test_a_yaml_config_sits_between_the_preset_and_the_flags(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("weight-decay: 0.001\nepochs: 3\nimg_size: 48\nval_crop_size: 40\n"
                    "run_record: {anything: 1}\n")
    r = cli("train", "--config", path, "--print-config", "--epochs", "4")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output)
    assert resolved == make_config("heated", "tiny", weight_decay=0.001, epochs=4,
                                   train_crop_size=48, val_crop_size=40,
                                   val_resize_size=55).__dict__


BAD_FILES = [("lrr: 0.1\n", "'lrr'"), ("lr: fast\n", "lr"), ("lr: -1\n", "lr"),
             ("lr: .nan\n", "lr"), ("amp: 3\n", "amp"), ("model: resnet99\n", "model"),
             ("stage: finetune\n", "stage"), ("- 1\n", "mapping"), ("a: [\n", "YAML"),
             ("in_chans: 3\n", "'in_chans'"), ("img_size: 0\n", "img_size")]


@pytest.mark.parametrize("text,needle", BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_a_bad_config_file_gets_one_line_naming_the_key(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    one_error(cli("train", "--config", path, "--print-config"), path, needle)


def test_a_missing_config_file_and_a_stage_of_another_command(tmp_path):
    one_error(cli("train", "--config", tmp_path / "none.json", "--print-config"), "none.json")
    path = tmp_path / "heated.json"
    path.write_text('{"stage": "heated"}')
    one_error(cli("finetune", "--from", "x.pt", "--config", path, "--print-config"), "stage")
