"""`pgnm-fast`: train (heated or baseline), finetune, eval, compare, synth, pack, validate.

Flag names follow torchvision's classification reference scripts where they apply. A user mistake
(missing data, bad checkpoint, unknown model, ...) prints one ``Error:`` line and exits non-zero.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading

import click

from .atomic import os_reason
from .config import IMPLS, PRESETS
from .errors import ConfigError, PgnmError
from .models import model_names
from .schedules import SCHEDULERS
from .validate import validate


def _one_line(e: Exception) -> str:
    """The user-facing line of an error (PgnmError already drops a worker's traceback)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
            err = click.ClickException(_one_line(e))
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
        click.option("--model", type=click.Choice(model_names()), default=None, help="Classifier."),
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
        click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), default=None,
                     help="Data loading: DALI (GPU or CPU-only), the plain PyTorch loader, or "
                          "auto: DALI where it is installed."),
        click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default=None,
                     help="A file that cannot be used (checked before the first epoch): stop "
                          "naming it (default), or leave it out and say how many."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast (CUDA or CPU)."),
        click.option("--graphs/--no-graphs", default=None, help="CUDA-graph-captured step (GPU)."),
        click.option("--sync-bn/--no-sync-bn", default=None, help="SyncBatchNorm under torchrun."),
        click.option("--seed", type=int, default=None),
        click.option("--print-freq", type=int, default=None, help="Log every N steps."),
        click.option("--average-last", type=int, default=None, metavar="N",
                     help="Also write averaged.pt: the weights averaged over the last N epochs "
                          "(fine-tune and --no-policy baseline; the paper's option is 3)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
    ]
    return functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def _split(kwargs):
    run = {k: kwargs.pop(k) for k in ("data", "out", "preset", "device")}
    return run, kwargs


@main.command()
@training_options
@click.option("--no-policy", is_flag=True, help="Baseline: the same classifier without masks.")
@click.option("--policy-model", type=click.Choice(model_names()), default=None)
@click.option("--policy-lr", type=float, default=None, help="Default: --lr / 10.")
@click.option("--grid", type=int, default=None, help="Mask grid G (G x G cells).")
@click.option("--impl", type=click.Choice(IMPLS), default=None, help="Mask step implementation.")
@click.option("--resume", type=str, default=None, help="Continue a run from its last.pt.")
def train(no_policy, resume, **kwargs):
    """Heated stage (policy + noise masks), or with --no-policy the baseline."""
    from .stages import run_stage
    run, overrides = _split(kwargs)
    run_stage("baseline" if no_policy else "heated", overrides=overrides, resume=resume,
              log=click.echo, **run)


@main.command()
@click.option("--from", "init_from", type=str, required=True,
              help="Checkpoint of the heated (or baseline) stage.")
@training_options
@click.option("--resume", type=str, default=None, help="Continue a fine-tune run from its last.pt.")
def finetune(init_from, resume, **kwargs):
    """Fine-tune a classifier without masks (the policy is dropped); linear warm-up."""
    from .stages import run_stage
    run, overrides = _split(kwargs)
    run_stage("finetune", overrides=overrides, resume=resume, init_from=init_from,
              log=click.echo, **run)


@main.command("eval")
@click.option("--checkpoint", type=str, required=True)
@click.option("--data", type=str, default=None, help="Default: the data the checkpoint was trained on.")
@click.option("--split", type=str, default="test", show_default=True)
@click.option("--json", "json_path", type=str, default=None, help="Write the metrics to this file.")
@click.option("-b", "--batch-size", type=int, default=None)
@click.option("-j", "--workers", type=int, default=None)
@click.option("--amp/--no-amp", default=False)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def evaluate(checkpoint, data, split, json_path, batch_size, workers, amp, device):
    """Top-1/5, balanced accuracy, macro precision/recall/F1 and one-vs-one ROC-AUC."""
    from .evaluate import evaluate_checkpoint
    from .metrics import format_metrics
    _at_least(("-b/--batch-size", batch_size, 1), ("-j/--workers", workers, 0))
    if json_path is not None:
        _check_output_file(json_path, "--json")
    metrics = evaluate_checkpoint(checkpoint, data, split, json_path, batch_size, workers, device,
                                  amp, log=click.echo, warn=lambda s: click.echo(s, err=True))
    click.echo(f"{split}: {format_metrics(metrics)}")
    if json_path:
        click.echo(f"metrics written to {json_path}")


@main.command()
@click.option("--out", type=str, required=True, help="Folder to write the data set into.")
@click.option("--images", type=int, default=2400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=96, show_default=True, help="Image side in pixels.")
@click.option("--layout", type=click.Choice(["radimagenet", "folders"]), default="radimagenet",
              show_default=True)
def synth(out, images, seed, size, layout):
    """Write a synthetic RadImageNet-like data set (CT/MR/US-like images, CSV splits)."""
    from .synth import make_synthetic
    root = make_synthetic(out, images=images, seed=seed, size=size, layout=layout)
    click.echo(f"wrote {images} synthetic images ({layout} layout) to {root}")


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
def pack(data, out, verify_path, on_bad_image, channels, workers):
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
              log=click.echo)


@main.command()
@click.option("--data", type=str, default=None,
              help="As for train (needs a test split); default: the embedded synthetic set.")
@click.option("--out", type=str, default=None,
              help="Folder for the three runs and compare.json (default runs/compare-<time>); "
                   "run again to continue an interrupted comparison.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--model", type=click.Choice(model_names()), default=None, help="Classifier.")
@click.option("--epochs", type=int, default=None, help="Heated and baseline epochs.")
@click.option("--finetune-epochs", type=int, default=None)
@click.option("-b", "--batch-size", type=int, default=None, help="Images per process.")
@click.option("-j", "--workers", type=int, default=None)
@click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), default=None)
@click.option("--amp/--no-amp", default=None)
@click.option("--graphs/--no-graphs", default=None)
@click.option("--impl", type=click.Choice(IMPLS), default=None, help="Mask step implementation.")
@click.option("--grid", type=int, default=None, help="Mask grid G.")
@click.option("--seed", type=int, default=None)
@click.option("--resamples", type=int, default=1000, show_default=True,
              help="Paired bootstrap resamples of the test images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def compare(data, out, preset, model, epochs, finetune_epochs, batch_size, workers, loader, amp,
            graphs, impl, grid, seed, resamples, device):
    """Does PGNM beat plain training here? Heated + fine-tune vs baseline, paired on the test split."""
    from .compare import compare as run_compare
    shared = dict(batch_size=batch_size, workers=workers, loader=loader, amp=amp, graphs=graphs,
                  seed=seed)
    run_compare(data, out, preset, overrides=dict(shared, model=model, epochs=epochs, impl=impl,
                                                  grid=grid),
                finetune_overrides=dict(shared, epochs=finetune_epochs), device=device,
                resamples=resamples, seed=seed or 0, log=click.echo)


main.add_command(validate)

if __name__ == "__main__":
    sys.exit(main())
