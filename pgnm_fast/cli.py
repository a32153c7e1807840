"""`pgnm-fast`: train (heated or baseline), finetune, eval, compare, transfer, plot, synth,
pack, validate, export.

Flag names follow torchvision's classification reference scripts where they apply. The training
settings' options come from :class:`pgnm_fast.config.TrainConfig`'s metadata
(:mod:`pgnm_fast.options`, listed in docs/flags.md); every command that trains or scores takes the
same execution flags (``--threads``, ``-j``, ``--device``, ``--amp``, ``--loader``, crop sizes,
``--img-size``), and numeric flags are checked with the settings' rules as they are parsed. A user mistake
(missing data, bad checkpoint, unknown model, ...) prints one ``Error:`` line and exits non-zero.
Each command imports what it needs (torch, scipy, scikit-learn) when it runs, so ``--help`` is quick.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading

import click

from .atomic import os_reason
from .config import PRESETS, rule_of  # noqa: F401 (PRESETS: the names --preset offers)
from .errors import ConfigError, PgnmError, first_line
from .names import DEVICES, MODELS
from .options import (
    CROPS,
    Option,
    checked,
    compose,
    default_text,
    echo_config,
    img_size_option,
    not_empty,
    resolve,
    run_options,
    settings_options,
    split_run,
    training_options,
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler or torchrun sends): ends a run as Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise Terminated


class _Group(click.Group):
    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _on_sigterm) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            return super().invoke(ctx)
        except PgnmError as e:
            err = click.ClickException(first_line(e))
            err.exit_code = e.exit_code
            raise err from None
        except OSError as e:
            if not e.filename:  # not about a path the user gave: a bug, keep its traceback
                raise
            err = click.ClickException(f"{e.filename}: {os_reason(e)}")
            err.exit_code = 2
            raise err from None
        except KeyboardInterrupt as e:
            what = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
            click.echo(f"Aborted ({what}).", err=True)
            ctx.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
        finally:
            if previous is not None:  # an embedding program (a test runner) keeps its own
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="pgnm-fast")
@click.option("--allow-nonfinite-weights", is_flag=True,
              help="Load outside weights that hold NaN or inf anyway, to inspect them (given "
                   "before the command; PGNM_FAST_ALLOW_NONFINITE_WEIGHTS=1 does the same); "
                   "export never writes them.")
def main(allow_nonfinite_weights):
    """PGNM pretraining for medical image classifiers: heated stage, fine-tune, evaluation."""
    if allow_nonfinite_weights:
        import os

        from .state_checks import NONFINITE_ENV
        os.environ[NONFINITE_ENV] = "1"


def _check_output_file(path, flag: str) -> None:
    from pathlib import Path

    from .folders import check_output_dir
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, not a file name")
    check_output_dir(Path(path).parent, flag)


WEIGHT_FORMS = ("a pgnm-fast checkpoint, a state dict (.pth, .safetensors), a timm / Hugging "
                "Face model folder or the authors' checkpoint")
INIT_HELP = WEIGHT_FORMS + "; a head of another class count is replaced."


def _stage(settings: dict, stage: str, path) -> str:
    """The stage a --config file names must be the command's (a baseline file: train --no-policy)."""
    wanted = settings.pop("stage", None)
    allowed = ("heated", "baseline") if stage != "finetune" else ("finetune",)
    if wanted is not None and wanted not in allowed:
        raise ConfigError(f"--config {path}: stage {wanted!r} is not one this command trains "
                          f"({' or '.join(allowed)})")
    return "baseline" if "baseline" in (stage, wanted) else stage


def _train(ctx, stage: str, kwargs: dict, resume, init_from) -> None:
    """train / finetune: the settings from --config and the flags, then run (or print) them."""
    from .batching import rebase
    from .config import config_from_dict, finish, make_config
    from .distributed import torchrun_env
    show = kwargs.pop("print_config")
    path = kwargs.get("config_file")
    settings = resolve(ctx, kwargs)
    stage = _stage(settings, stage, path)
    run, overrides = split_run(settings)
    if not show:
        from .api import train
        train(stage, resume=resume, init_from=init_from, log=click.echo, **run, **overrides)
        return
    data = run.get("data")
    world = torchrun_env().world_size
    notes = []  # YAML comments, printed once the settings resolve
    if resume:  # the checkpoint's settings, then the flags (as run_stage does)
        from .run_state import load_run_state
        state = load_run_state(resume)
        given_values = {k: v for k, v in overrides.items() if v is not None}
        stored = dataclasses.asdict(config_from_dict(state.config))
        cfg = finish(rebase(stored, given_values, world), world, notes.append)
        data = data or state.data
    else:
        cfg = make_config(stage, run["preset"], world, notes.append, **overrides)
    for line in notes:
        click.echo(f"# {line}")
    echo_config(cfg, data, world)


@main.command()
@training_options("heated")
@click.option("--no-policy", is_flag=True, help="Baseline: the same classifier without masks.")
@click.option("--resume", type=str, default=None, help="Continue a run from its last.pt.")
@click.option("--initial-checkpoint", "init_from", type=str, default=None, metavar="PATH",
              help="Initial weights: " + INIT_HELP)
@click.pass_context
def train(ctx, no_policy, resume, init_from, **kwargs):
    """Heated stage (policy + noise masks), or with --no-policy the baseline."""
    _train(ctx, "baseline" if no_policy else "heated", kwargs, resume, init_from)


@main.command()
@click.option("--from", "--initial-checkpoint", "init_from", type=str, required=True,
              metavar="PATH", help="The heated (or baseline) stage's checkpoint, or other "
                                   "initial weights: " + INIT_HELP)
@training_options("finetune")
@click.option("--resume", type=str, default=None, help="Continue a fine-tune run from its last.pt.")
@click.pass_context
def finetune(ctx, init_from, resume, **kwargs):
    """Fine-tune a classifier without masks (the policy is dropped); linear warm-up."""
    _train(ctx, "finetune", kwargs, resume, init_from)


def _sizes(ctx, values: dict, names) -> dict:
    """The crop sizes given (``--img-size`` expanded, explicit crop flags winning)."""
    resolved = resolve(ctx, values)
    return {k: resolved[k] for k in names if resolved.get(k) is not None}


CHECKPOINTS = "the checkpoint's"
THREADS = dict(threads="CPU runs: intra-op threads (0: the cores less those other processes keep "
                       "busy, at least 1).")
VAL_CROPS = ("val_resize_size", "val_crop_size")


@main.command("eval")
@click.option("--checkpoint", type=str, required=True, help="Weights to score: " + WEIGHT_FORMS + ".")
@click.option("--model", type=click.Choice(MODELS), default=None,
              help="Architecture of a state dict that does not name one.")
@click.option("--data", "--data-path", "data", type=str, default=None,
              help="Data set (any form train reads); default: the data the checkpoint was trained on.")
@click.option("--split", type=str, default="test", help="Split to score: train, val or test.")
@click.option("--json", "json_path", type=str, default=None,
              help="Write the metrics to this file, and beside it NAME.per_class.csv "
                   "(precision/recall/F1/support per class) and NAME.confusion.csv/.png.")
@click.option("--predictions", "predictions_path", type=str, default=None, metavar="FILE.csv",
              help="Write one row per image: path, label, predicted class, top-5 classes and scores.")
@click.option("--all-scores", is_flag=True,
              help="With --predictions: also every class's score, one column per class.")
@click.option("-b", "--batch-size", type=int, default=None, callback=checked("positive"),
              cls=Option, show_default="the checkpoint's", help="Images per batch.")
@compose(settings_options(("workers", "threads", "loader", "amp") + VAL_CROPS, helps=THREADS,
                          defaults=dict(workers=CHECKPOINTS, val_resize_size=CHECKPOINTS,
                                        val_crop_size=CHECKPOINTS,
                                        loader="torch if the checkpoint's run used it, else auto")))
@img_size_option("the checkpoint's crops")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              help="auto: CUDA where available, else the CPU.")
@click.pass_context
def evaluate(ctx, checkpoint, model, data, split, json_path, predictions_path, all_scores,
             batch_size, workers, threads, loader, amp, device, **crops):
    """Top-1/5, balanced accuracy, macro precision/recall/F1 and one-vs-one ROC-AUC."""
    from .evaluate import evaluate_checkpoint
    from .metrics import format_metrics
    sizes = _sizes(ctx, crops, VAL_CROPS)
    if json_path is not None:
        _check_output_file(json_path, "--json")
    if all_scores and predictions_path is None:
        raise click.UsageError("--all-scores adds columns to --predictions FILE.csv: pass both")
    from .threads import command_log
    log = command_log(threads, device, click.echo)
    metrics = evaluate_checkpoint(checkpoint, data, split, json_path, batch_size, workers, device,
                                  bool(amp), log=log, warn=lambda s: click.echo(s, err=True),
                                  predictions_path=predictions_path, model_name=model,
                                  all_scores=all_scores, loader=loader, sizes=sizes)
    log(f"{split}: {format_metrics(metrics)}")


@main.command()
@click.argument("run", type=str)
def plot(run):
    """Draw curves.png, masks.png and confusion.png of a run folder from the files in it."""
    from .plots import plot_run
    for path in plot_run(run):
        click.echo(f"wrote {path}")


@main.command()
@click.option("--out", type=str, required=True, callback=not_empty,
              help="Folder to write the data set into.")
@click.option("--images", type=int, default=2400, help="Images in all (train, val and test).")
@click.option("--seed", type=int, default=0, callback=checked(rule_of("seed")),
              help="Seed of the images and the splits.")
@click.option("--size", type=int, default=96, help="Image side in pixels.")
@click.option("--layout", type=click.Choice(["radimagenet", "folders"]), default="radimagenet",
              help="radimagenet: CSV splits as RadImageNet's; folders: split/class/image folders.")
@click.option("--concepts", type=click.Choice(["default", "unseen"]), default="default",
              help="unseen: 5 classes absent from the default set (new lesion kinds and places), "
                   "a downstream set for `pgnm-fast transfer`.")
def synth(out, images, seed, size, layout, concepts):
    """Write a synthetic RadImageNet-like data set (CT/MR/US-like images, CSV splits)."""
    from .synth import make_synthetic
    root = make_synthetic(out, images=images, seed=seed, size=size, layout=layout,
                          concepts=concepts)
    click.echo(f"wrote {images} synthetic images ({layout} layout, {concepts} concepts) to {root}")


@main.command()
@click.option("--data", "--data-path", "data", type=str, default=None,
              help="Data set to pack (RadImageNet, class folders or a MedMNIST .npz file).")
@click.option("--out", type=str, default=None, callback=not_empty,
              help="Cache folder to write (created).")
@click.option("--verify", "verify_path", type=str, default=None, metavar="CACHE",
              help="Check a finished cache against its manifest instead of packing.")
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error",
              help="A file that cannot be used: stop naming it, or leave it out and list it in "
                   "CACHE/skipped.txt.")
@click.option("--channels", type=click.Choice(["auto", "grey", "rgb"]), default="auto",
              help="auto: RGB only when every image is colour.")
@click.option("-j", "--workers", type=int, default=None, callback=checked(rule_of("workers")),
              cls=Option, show_default="the CPUs", help="Decoding processes.")
@click.option("--recheck", is_flag=True,
              help="Check every file afresh instead of reusing the verdict cached beside the data.")
def pack(data, out, verify_path, on_bad_image, channels, workers, recheck):
    """Decode every image once into a memory-mapped cache that training reads with --data.

    Resumable: run the same command again after an interruption."""
    from .pipelines.pack import pack as pack_data
    from .pipelines.pack import verify
    if verify_path is not None:
        if data or out:
            raise ConfigError("--verify CACHE takes no --data or --out")
        verify(verify_path, log=click.echo)
        return
    if not data or not out:
        raise ConfigError("pack needs --data ROOT and --out CACHE (or --verify CACHE)")
    pack_data(data, out, on_bad_image=on_bad_image, channels=channels, workers=workers,
              log=click.echo, recheck=recheck)


EXECUTION = ("batch_size", "workers", "threads", "loader", "amp", "graphs") + CROPS


@main.command()
@compose(run_options("Folder for the three runs and compare.json (default "
                     "runs/compare-<time>); run again to continue an interrupted comparison."))
@compose(settings_options(("model", "epochs", "impl", "grid") + EXECUTION,
                          helps=dict(epochs="Heated and baseline epochs.")))
@click.option("--finetune-epochs", type=int, default=None, cls=Option,
              show_default=default_text("epochs", "finetune"), help="Fine-tune epochs.",
              callback=checked("positive", "--finetune-epochs (the fine-tune stage's --epochs)"))
@click.option("--seed", type=int, default=0, callback=checked("seed"),
              help="First seed; seed s sets data order, masks and initialisation.")
@click.option("--seeds", type=int, default=1, callback=checked("positive"),
              help="Seeds per arm (--seed, --seed + 1, ...); run again with more to add seeds.")
@click.option("--finetune-from", type=click.Choice(["last", "best"]), default="last",
              help="Fine-tune from the heated stage's last epoch (the authors' protocol) or its "
                   "best.pt (picked on masked validation).")
@click.option("--match-budget", is_flag=True,
              help="Train the baseline as many epochs in all as heated + fine-tune.")
@click.option("--resamples", type=int, default=1000, callback=checked("positive"),
              help="Bootstrap resamples of the test images.")
@click.option("--initial-checkpoint", type=str, default=None, metavar="PATH",
              help="Weights both arms start from (the heated stage and the baseline): any form "
                   "train's --initial-checkpoint reads.")
@click.option("--stage-set", "stage_set", type=str, multiple=True, metavar="STAGE.KEY=VALUE",
              help="A setting for one stage (heated, finetune, baseline) alone, e.g. "
                   "heated.lr=0.0125 or baseline.epochs=8; repeat for more.")
@click.option("--heated-lr", type=float, default=None, help="The heated stage's --lr.")
@click.option("--finetune-lr", type=float, default=None, help="The fine-tune's --lr.")
@click.option("--baseline-lr", type=float, default=None, help="The baseline's --lr.")
@click.option("--allow-unequal-lr", is_flag=True,
              help="Let the heated stage and the baseline train at different lr per image (the "
                   "report then says so).")
@click.option("--score", is_flag=True, help="No training: score the runs given as pairs "
              "PGNM_RUN BASELINE_RUN ... (or a list file of them) with the same report.")
@click.argument("runs", nargs=-1)
@click.pass_context
def compare(ctx, data, out, preset, device, finetune_epochs, seed, seeds, finetune_from,
            match_budget, resamples, initial_checkpoint, stage_set, heated_lr, finetune_lr,
            baseline_lr, allow_unequal_lr, score, runs, **settings):
    """Does PGNM beat plain training here? Heated + fine-tune vs baseline over seeds, paired on
    the test split, with 95% intervals over seeds and test images."""
    from .compare import compare as run_compare
    from .compare import score as score_runs
    from .compare_settings import stage_sets
    if score or runs:
        if not score or initial_checkpoint or stage_set or heated_lr or finetune_lr or baseline_lr:
            raise ConfigError("compare takes runs only with --score, which trains nothing (no "
                              "--initial-checkpoint, --stage-set or --<stage>-lr)")
        return score_runs(runs, data, out, device, resamples, log=click.echo)
    sets = stage_sets(stage_set, heated_lr, finetune_lr, baseline_lr)
    settings = resolve(ctx, settings)
    shared = {k: settings.pop(k) for k in EXECUTION}
    run_compare(data, out, preset, overrides=dict(shared, **settings),
                finetune_overrides=dict(shared, epochs=finetune_epochs), device=device,
                resamples=resamples, seed=seed, seeds=seeds, finetune_from=finetune_from,
                match_budget=match_budget, log=click.echo, stage_settings=sets,
                initial_checkpoint=initial_checkpoint, allow_unequal_lr=allow_unequal_lr)


def _shots(ctx, param, value):
    from .transfer_subsets import parse_shots
    return parse_shots(value)


@main.command()
@click.option("--from", "froms", type=str, multiple=True, required=True,
              help="Starting weights, any form --initial-checkpoint reads (repeat the flag for "
                   "each), e.g. compare's seed-0/finetune/best.pt, or an exported folder.")
@click.option("--label", "labels", type=str, multiple=True,
              help="A name per --from, in order (default: the checkpoint's folder).")
@click.option("--reference", type=str, default=None, metavar="LABEL",
              help="Checkpoint the others are compared with, paired by subset (default: the "
                   "first --from).")
@click.option("--data", "--data-path", "data", type=str, required=True,
              help="Downstream data set with train and test splits (any form train reads).")
@click.option("--shots", type=str, default="16,32,64,128,256", callback=_shots,
              help="Training images in all (class-stratified), comma-separated.")
@click.option("--repeats", type=int, default=5, callback=checked("positive"),
              help="Subsets drawn per n (seeded; the same for every checkpoint).")
@click.option("--out", "--output-dir", "out", type=str, default=None, callback=not_empty,
              help="Folder for transfer.json and transfer.png (default runs/transfer-<time>); "
                   "run again to continue an interrupted transfer or to add shots, repeats or "
                   "checkpoints.")
@click.option("--probe", is_flag=True,
              help="Train only the new head, BatchNorm frozen (else the whole network).")
@click.option("--steps", type=int, default=100, callback=checked("positive"),
              help="SGD steps per run.")
@click.option("--lr", type=float, default=None, callback=checked(rule_of("lr")), cls=Option,
              show_default="0.01; 0.1 with --probe", help="Peak learning rate, cosine to 0.")
@click.option("-b", "--batch-size", type=int, default=32, callback=checked(rule_of("batch_size")),
              help="Images per step (at most n).")
@click.option("--seed", type=int, default=0, callback=checked(rule_of("seed")),
              help="Seed of the subsets, the new heads and the augmentation.")
@click.option("-j", "--workers", type=int, default=2, callback=checked(rule_of("workers")),
              help="Loader processes for the test split (read once).")
@compose(settings_options(("threads",), helps=THREADS))
@click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), default="auto",
              help="Loader of the test split.")
@click.option("--amp/--no-amp", default=False, help="bf16 autocast (CUDA or CPU).")
@compose(settings_options(CROPS, defaults=dict.fromkeys(CROPS, CHECKPOINTS)))
@img_size_option("the checkpoint's crops")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              help="auto: CUDA where available, else the CPU.")
@click.pass_context
def transfer(ctx, froms, labels, reference, data, shots, repeats, out, probe, steps, lr, batch_size, seed,
             workers, threads, loader, amp, device, **crops):
    """Few-shot transfer: fine-tune each checkpoint on n images of a downstream set, score the
    test split; F1 against n with 95% intervals over repeats."""
    from .threads import command_log
    from .transfer import transfer as run_transfer
    sizes = _sizes(ctx, crops, CROPS)
    log = command_log(threads, device, click.echo)
    run_transfer(froms, data, shots, repeats=repeats, out=out, probe=probe, steps=steps, lr=lr,
                 batch_size=batch_size, seed=seed, labels=labels, workers=workers, loader=loader,
                 amp=amp, device=device, log=log, sizes=sizes, reference=reference)


@main.command()
@click.option("--device", default="cpu", help="cpu or cuda (or cuda:N).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number and 'passed' to this file.")
@click.option("--seed", type=int, default=None, callback=checked(rule_of("seed")), cls=Option,
              show_default="fresh", help="Seed of the random inputs.")
@click.option("--quick", is_flag=True, help="A smaller sweep.")
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto",
              help="Fast path to check: auto = Triton on CUDA, torch on the CPU (triton on the CPU "
                   "needs TRITON_INTERPRET=1).")
def validate(device, json_path, seed, quick, backend):
    """Check the fast mask step against the reference; exit 0 only if every check passes."""
    from .validate import validate_command
    validate_command(device, json_path, seed, quick, backend)


@main.command()
@click.argument("checkpoint", type=str)
@click.option("--out", type=str, required=True, callback=not_empty,
              help="Folder to write (created).")
@click.option("--in-chans", type=click.Choice(["1", "3"]), default=None, cls=Option,
              show_default=CHECKPOINTS,
              help="Stem of the export: 3 for RGB pipelines (the grey stem / 3 per channel, same "
                   "logits on a grey image replicated).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torchscript"]),
              default="safetensors",
              help="safetensors: model.safetensors + timm config.json, loaded by "
                   "timm.create_model('local-dir:OUT', pretrained=True); torchscript: model.pt.")
@click.option("--license", "license_id", default=None, cls=Option, show_default="none written",
              help="Licence identifier for config.json and the model card (e.g. apache-2.0); "
                   "none is written unless given. The data owner's terms apply in any case.")
def export(checkpoint, out, in_chans, fmt, license_id):
    """Write a checkpoint's classifier as a timm model folder (or TorchScript) with a model card."""
    from .weights import export as export_weights
    export_weights(checkpoint, out, in_chans=int(in_chans) if in_chans else None, fmt=fmt,
                   license=license_id, log=click.echo)


if __name__ == "__main__":
    sys.exit(main())
