"""`pgnm-fast`: train (heated or baseline), finetune, eval, compare, transfer, plot, synth,
pack, validate.

Flag names follow torchvision's classification reference scripts where they apply. A user mistake
(missing data, bad checkpoint, unknown model, ...) prints one ``Error:`` line and exits non-zero.
Each command imports what it needs (torch, scipy, scikit-learn) when it runs, so ``--help`` is quick.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading

import click

from .atomic import os_reason
from .errors import ConfigError, PgnmError, first_line
from .names import IMPLS, MODELS, OPTIMIZERS, SCHEDULERS

PRESETS = ("paper", "tiny")  # pgnm_fast.config.PRESETS (a test checks they agree)


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgnm-fast")
def main():
    """PGNM pretraining for medical image classifiers: heated stage, fine-tune, evaluation."""


def _at_least(*checks) -> None:
    """``(flag, value, minimum)``: one line naming the first flag below its minimum (None: unset)."""
    for flag, value, minimum in checks:
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}, not {value}")


def _check_output_file(path, flag: str) -> None:
    from pathlib import Path

    from .folders import check_output_dir
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, not a file name")
    check_output_dir(Path(path).parent, flag)


def training_options(f):
    """The flags `train` and `finetune` share (torchvision reference names)."""
    options = [
        click.option("--data", type=str, default=None,
                     help="RadImageNet root (CSV splits), class-folder root or a cache made by "
                          "`pgnm-fast pack`; default: the embedded synthetic data set (made once "
                          "in a cache folder)."),
        click.option("--out", "--output-dir", "out", type=str, default=None,
                     help="Run folder for last.pt, best.pt, metrics.jsonl (default runs/<stage>-<time>)."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
                     help="tiny: minutes on a CPU; paper: the authors' schedules."),
        click.option("--model", type=click.Choice(MODELS), default=None, help="Classifier."),
        click.option("--epochs", type=int, default=None),
        click.option("-b", "--batch-size", type=int, default=None, help="Images per process."),
        click.option("--lr", type=float, default=None),
        click.option("--momentum", type=float, default=None),
        click.option("--wd", "--weight-decay", "weight_decay", type=float, default=None),
        click.option("--lr-scheduler", type=click.Choice(SCHEDULERS), default=None),
        click.option("--lr-step-size", type=int, default=None),
        click.option("--lr-gamma", type=float, default=None),
        click.option("--lr-warmup-epochs", type=int, default=None),
        click.option("--lr-warmup-decay", type=float, default=None),
        click.option("--train-crop-size", type=int, default=None),
        click.option("--val-resize-size", type=int, default=None),
        click.option("--val-crop-size", type=int, default=None),
        click.option("-j", "--workers", type=int, default=None,
                     help="Data-loading processes (plain loader) or DALI CPU threads."),
        click.option("--loader", type=click.Choice(["auto", "device", "dali", "torch"]),
                     default=None,
                     help="Data loading: a packed cache held in device memory (device), DALI "
                          "(GPU or CPU-only), the plain PyTorch loader, or auto: device for a "
                          "packed cache that fits on the GPU, else DALI where it is installed."),
        click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default=None,
                     help="A file that cannot be used (checked before the first epoch): stop "
                          "naming it (default), or leave it out and say how many."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast (CUDA or CPU)."),
        click.option("--graphs/--no-graphs", default=None, help="CUDA-graph-captured step (GPU)."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="NHWC model and batches (default: on for CUDA, off on the CPU)."),
        click.option("--compile", "--torchcompile", "compile", is_flag=True, default=None,
                     help="torch.compile the classifier and policy (not with --graphs)."),
        click.option("--sync-bn/--no-sync-bn", default=None, help="SyncBatchNorm under torchrun."),
        click.option("--seed", type=int, default=None),
        click.option("--print-freq", type=int, default=None, help="Log every N steps."),
        click.option("--in-chans", "channels", type=click.Choice(["1", "3"]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="Classifier input channels: 1 (grey, default) or 3 (the grey image "
                          "replicated, the authors' form). A 3-channel checkpoint on a 1-channel "
                          "run has its stem summed and trained with lr x3, weight decay /3: the "
                          "same SGD/AdamW steps as the 3-channel stem."),
        click.option("--opt", type=click.Choice(OPTIMIZERS), default=None,
                     help="Classifier optimiser (default sgd with --momentum, the paper's; the "
                          "policy always uses SGD)."),
        click.option("--label-smoothing", type=float, default=None,
                     help="Cross-entropy label smoothing (0: off, the paper's)."),
        click.option("--clip-grad-norm", type=float, default=None, metavar="MAX",
                     help="Clip each network's gradient 2-norm to MAX (0: off), on the device."),
        click.option("--mean", type=float, default=None,
                     help="Input normalisation mean on [0, 1] pixels (default: RadImageNet's)."),
        click.option("--std", type=float, default=None,
                     help="Input normalisation std (default: RadImageNet's)."),
        click.option("--class-balanced/--no-class-balanced", default=None,
                     help="Draw training images with weight 1 / class size (imbalanced sets); "
                          "deterministic by --seed, sharded under torchrun."),
        click.option("--average-last", type=int, default=None, metavar="N",
                     help="Also write averaged.pt: the weights averaged over the last N epochs "
                          "(fine-tune and --no-policy baseline; the paper's option is 3)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
        click.option("--threads", type=int, default=None, metavar="N",
                     help="CPU runs: intra-op threads (default: the cores less those other "
                          "processes keep busy; at least 1)."),
        click.option("--recheck", is_flag=True,
                     help="Check every image file afresh instead of reusing the verdict cached "
                          "beside the data."),
        click.option("--tensorboard/--no-tensorboard", default=None,
                     help="Also write TensorBoard event files (scalars, mask images) to "
                          "RUN/tensorboard (needs the tensorboard package)."),
    ]
    return functools.reduce(lambda g, opt: opt(g), reversed(options), f)


WEIGHT_FORMS = ("a pgnm-fast checkpoint, a state dict (.pth, .safetensors), a timm / Hugging "
                "Face model folder or the authors' checkpoint")
INIT_HELP = WEIGHT_FORMS + "; a head of another class count is replaced."


def _split(kwargs):
    run = {k: kwargs.pop(k) for k in ("data", "out", "preset", "device", "recheck")}
    return run, kwargs


@main.command()
@training_options
@click.option("--no-policy", is_flag=True, help="Baseline: the same classifier without masks.")
@click.option("--policy-model", type=click.Choice(MODELS), default=None)
@click.option("--policy-lr", type=float, default=None, help="Default: --lr / 10.")
@click.option("--grid", type=int, default=None, help="Mask grid G (G x G cells).")
@click.option("--impl", type=click.Choice(IMPLS), default=None, help="Mask step implementation.")
@click.option("--resume", type=str, default=None, help="Continue a run from its last.pt.")
@click.option("--initial-checkpoint", "init_from", type=str, default=None, metavar="PATH",
              help="Initial weights: " + INIT_HELP)
def train(no_policy, resume, init_from, **kwargs):
    """Heated stage (policy + noise masks), or with --no-policy the baseline."""
    from .stages import run_stage
    run, overrides = _split(kwargs)
    run_stage("baseline" if no_policy else "heated", overrides=overrides, resume=resume,
              init_from=init_from, log=click.echo, **run)


@main.command()
@click.option("--from", "--initial-checkpoint", "init_from", type=str, required=True,
              metavar="PATH", help="The heated (or baseline) stage's checkpoint, or other "
                                   "initial weights: " + INIT_HELP)
@training_options
@click.option("--resume", type=str, default=None, help="Continue a fine-tune run from its last.pt.")
def finetune(init_from, resume, **kwargs):
    """Fine-tune a classifier without masks (the policy is dropped); linear warm-up."""
    from .stages import run_stage
    run, overrides = _split(kwargs)
    run_stage("finetune", overrides=overrides, resume=resume, init_from=init_from,
              log=click.echo, **run)


@main.command("eval")
@click.option("--checkpoint", type=str, required=True, help="Weights to score: " + WEIGHT_FORMS + ".")
@click.option("--model", type=click.Choice(MODELS), default=None,
              help="Architecture of a state dict that does not name one.")
@click.option("--data", type=str, default=None, help="Default: the data the checkpoint was trained on.")
@click.option("--split", type=str, default="test", show_default=True)
@click.option("--json", "json_path", type=str, default=None,
              help="Write the metrics to this file, and beside it NAME.per_class.csv "
                   "(precision/recall/F1/support per class) and NAME.confusion.csv/.png.")
@click.option("--predictions", "predictions_path", type=str, default=None, metavar="FILE.csv",
              help="Write one row per image: path, label, predicted class, top-5 classes and scores.")
@click.option("-b", "--batch-size", type=int, default=None)
@click.option("-j", "--workers", type=int, default=None)
@click.option("--amp/--no-amp", default=False)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def evaluate(checkpoint, model, data, split, json_path, predictions_path, batch_size, workers, amp,
             device):
    """Top-1/5, balanced accuracy, macro precision/recall/F1 and one-vs-one ROC-AUC."""
    from .evaluate import evaluate_checkpoint
    from .metrics import format_metrics
    _at_least(("-b/--batch-size", batch_size, 1), ("-j/--workers", workers, 0))
    if json_path is not None:
        _check_output_file(json_path, "--json")
    metrics = evaluate_checkpoint(checkpoint, data, split, json_path, batch_size, workers, device,
                                  amp, log=click.echo, warn=lambda s: click.echo(s, err=True),
                                  predictions_path=predictions_path, model_name=model)
    click.echo(f"{split}: {format_metrics(metrics)}")


@main.command()
@click.argument("run", type=str)
def plot(run):
    """Draw curves.png, masks.png and confusion.png of a run folder from the files in it."""
    from .plots import plot_run
    for path in plot_run(run):
        click.echo(f"wrote {path}")


@main.command()
@click.option("--out", type=str, required=True, help="Folder to write the data set into.")
@click.option("--images", type=int, default=2400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=96, show_default=True, help="Image side in pixels.")
@click.option("--layout", type=click.Choice(["radimagenet", "folders"]), default="radimagenet",
              show_default=True)
@click.option("--concepts", type=click.Choice(["default", "unseen"]), default="default",
              show_default=True,
              help="unseen: 5 classes absent from the default set (new lesion kinds and places), "
                   "a downstream set for `pgnm-fast transfer`.")
def synth(out, images, seed, size, layout, concepts):
    """Write a synthetic RadImageNet-like data set (CT/MR/US-like images, CSV splits)."""
    from .synth import make_synthetic
    root = make_synthetic(out, images=images, seed=seed, size=size, layout=layout,
                          concepts=concepts)
    click.echo(f"wrote {images} synthetic images ({layout} layout, {concepts} concepts) to {root}")


@main.command()
@click.option("--data", type=str, default=None, help="Data set to pack (RadImageNet or class folders).")
@click.option("--out", type=str, default=None, help="Cache folder to write (created).")
@click.option("--verify", "verify_path", type=str, default=None, metavar="CACHE",
              help="Check a finished cache against its manifest instead of packing.")
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error",
              show_default=True, help="A file that cannot be used: stop naming it, or leave it "
                                      "out and list it in CACHE/skipped.txt.")
@click.option("--channels", type=click.Choice(["auto", "grey", "rgb"]), default="auto",
              show_default=True, help="auto: RGB only when every image is colour.")
@click.option("-j", "--workers", type=int, default=None, help="Decoding processes (default: CPUs).")
@click.option("--recheck", is_flag=True,
              help="Check every file afresh instead of reusing the verdict cached beside the data.")
def pack(data, out, verify_path, on_bad_image, channels, workers, recheck):
    """Decode every image once into a memory-mapped cache that training reads with --data.

    Resumable: run the same command again after an interruption."""
    from .pipelines.pack import pack as pack_data
    from .pipelines.pack import verify
    _at_least(("-j/--workers", workers, 0),)
    if verify_path is not None:
        if data or out:
            raise ConfigError("--verify CACHE takes no --data or --out")
        verify(verify_path, log=click.echo)
        return
    if not data or not out:
        raise ConfigError("pack needs --data ROOT and --out CACHE (or --verify CACHE)")
    pack_data(data, out, on_bad_image=on_bad_image, channels=channels, workers=workers,
              log=click.echo, recheck=recheck)


@main.command()
@click.option("--data", type=str, default=None,
              help="As for train (needs a test split); default: the embedded synthetic set.")
@click.option("--out", type=str, default=None,
              help="Folder for the three runs and compare.json (default runs/compare-<time>); "
                   "run again to continue an interrupted comparison.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--model", type=click.Choice(MODELS), default=None, help="Classifier.")
@click.option("--epochs", type=int, default=None, help="Heated and baseline epochs.")
@click.option("--finetune-epochs", type=int, default=None)
@click.option("-b", "--batch-size", type=int, default=None, help="Images per process.")
@click.option("-j", "--workers", type=int, default=None)
@click.option("--loader", type=click.Choice(["auto", "device", "dali", "torch"]), default=None)
@click.option("--amp/--no-amp", default=None)
@click.option("--graphs/--no-graphs", default=None)
@click.option("--impl", type=click.Choice(IMPLS), default=None, help="Mask step implementation.")
@click.option("--grid", type=int, default=None, help="Mask grid G.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="First seed; seed s sets data order, masks and initialisation.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Seeds per arm (--seed, --seed + 1, ...); run again with more to add seeds.")
@click.option("--finetune-from", type=click.Choice(["last", "best"]), default="last",
              show_default=True,
              help="Fine-tune from the heated stage's last epoch (the authors' protocol) or its "
                   "best.pt (picked on masked validation).")
@click.option("--match-budget", is_flag=True,
              help="Train the baseline as many epochs in all as heated + fine-tune.")
@click.option("--resamples", type=int, default=1000, show_default=True,
              help="Bootstrap resamples of the test images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def compare(data, out, preset, model, epochs, finetune_epochs, batch_size, workers, loader, amp,
            graphs, impl, grid, seed, seeds, finetune_from, match_budget, resamples, device):
    """Does PGNM beat plain training here? Heated + fine-tune vs baseline over seeds, paired on
    the test split, with 95% intervals over seeds and test images."""
    from .compare import compare as run_compare
    shared = dict(batch_size=batch_size, workers=workers, loader=loader, amp=amp, graphs=graphs)
    run_compare(data, out, preset, overrides=dict(shared, model=model, epochs=epochs, impl=impl,
                                                  grid=grid),
                finetune_overrides=dict(shared, epochs=finetune_epochs), device=device,
                resamples=resamples, seed=seed, seeds=seeds, finetune_from=finetune_from,
                match_budget=match_budget, log=click.echo)


@main.command()
@click.option("--from", "froms", type=str, multiple=True, required=True,
              help="Starting checkpoint (repeat the flag for each), e.g. compare's "
                   "seed-0/finetune/best.pt and seed-0/baseline/best.pt.")
@click.option("--label", "labels", type=str, multiple=True,
              help="A name per --from, in order (default: the checkpoint's folder).")
@click.option("--data", type=str, required=True,
              help="Downstream data set with train and test splits (any layout train reads).")
@click.option("--shots", type=str, default="16,32,64,128,256", show_default=True,
              help="Training images in all (class-stratified), comma-separated.")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Subsets drawn per n (seeded; the same for every checkpoint).")
@click.option("--out", type=str, default=None,
              help="Folder for transfer.json and transfer.png (default runs/transfer-<time>); "
                   "run again to continue an interrupted transfer or to add shots, repeats or "
                   "checkpoints.")
@click.option("--probe", is_flag=True,
              help="Train only the new head, BatchNorm frozen (else the whole network).")
@click.option("--steps", type=int, default=100, show_default=True, help="SGD steps per run.")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate, cosine to 0 (default 0.01; 0.1 with --probe).")
@click.option("-b", "--batch-size", type=int, default=32, show_default=True,
              help="Images per step (at most n).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-j", "--workers", type=int, default=2, show_default=True,
              help="Loader processes for the test split (read once).")
@click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), default="auto",
              show_default=True, help="Loader of the test split.")
@click.option("--amp/--no-amp", default=False)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def transfer(froms, labels, data, shots, repeats, out, probe, steps, lr, batch_size, seed,
             workers, loader, amp, device):
    """Few-shot transfer: fine-tune each checkpoint on n images of a downstream set, score the
    test split; F1 against n with 95% intervals over repeats."""
    from .transfer import parse_shots
    from .transfer import transfer as run_transfer
    run_transfer(froms, data, parse_shots(shots), repeats=repeats, out=out, probe=probe,
                 steps=steps, lr=lr, batch_size=batch_size, seed=seed, labels=labels,
                 workers=workers, loader=loader, amp=amp, device=device, log=click.echo)


@main.command()
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (or cuda:N)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="write every number and 'passed' to this file")
@click.option("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
@click.option("--quick", is_flag=True, help="a smaller sweep")
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="fast path to check: auto = Triton on CUDA, torch on the CPU (triton on the CPU needs "
                   "TRITON_INTERPRET=1)")
def validate(device, json_path, seed, quick, backend):
    """Check the fast mask step against the reference; exit 0 only if every check passes."""
    from .validate import validate_command
    validate_command(device, json_path, seed, quick, backend)


@main.command()
@click.argument("checkpoint", type=str)
@click.option("--out", type=str, required=True, help="Folder to write (created).")
@click.option("--in-chans", type=click.Choice(["1", "3"]), default=None,
              help="Stem of the export: 3 for RGB pipelines (the grey stem / 3 per channel, same "
                   "logits on a grey image replicated); default: the checkpoint's.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torchscript"]),
              default="safetensors", show_default=True,
              help="safetensors: model.safetensors + timm config.json, loaded by "
                   "timm.create_model('local-dir:OUT', pretrained=True); torchscript: model.pt.")
def export(checkpoint, out, in_chans, fmt):
    """Write a checkpoint's classifier as a timm model folder (or TorchScript)."""
    from .weights import export as export_weights
    export_weights(checkpoint, out, in_chans=int(in_chans) if in_chans else None, fmt=fmt,
                   log=click.echo)


if __name__ == "__main__":
    sys.exit(main())
