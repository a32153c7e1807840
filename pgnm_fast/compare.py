"""`pgnm-fast compare`: does PGNM beat plain training on this data? One command, the paper's
protocol (docs/method.md §5 and §6): the heated stage, its fine-tune, and the baseline (the same
classifier trained the same way without masks), then both final models on the test split, paired.

Runs go to ``OUT/heated``, ``OUT/finetune`` and ``OUT/baseline``. Running the same command again
continues where it stopped: a finished stage is reused, an interrupted one resumed from its
``last.pt``. The report (printed, and ``OUT/compare.json``) gives the metrics of docs/method.md §6
of both models on the test split, and for top-1, balanced accuracy and macro F1 the difference PGNM - baseline
with a 95% paired bootstrap interval over the test images and the share of resamples in which
PGNM is ahead, plus each stage's wall time.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .config import make_config
from .distributed import shutdown
from .errors import ConfigError, DataError
from .evaluate import predict_checkpoint, write_json_atomic
from .folders import check_output_dir
from .metrics import (BOOTSTRAP_KEYS, METRIC_KEYS, classification_metrics, json_safe,
                      paired_bootstrap)
from .pipelines.sources import open_source
from .run_state import load_run_state
from .stages import resolve_data, run_stage


def _stage(stage, folder: Path, log, **kwargs) -> tuple[Path, float]:
    """Train ``stage`` into ``folder``: fresh, resumed, or reused when already finished."""
    last = folder / "last.pt"
    resume = None
    if last.exists():
        state = load_run_state(last)
        if state.is_finished:
            log(f"compare: {stage} already finished its {state.config['epochs']} epochs in "
                f"{folder}: reusing it (another --out trains afresh)")
            return folder, 0.0
        log(f"compare: {stage} stopped after epoch {state.epoch} in {folder}: resuming")
        resume = last
    t0 = time.perf_counter()
    run_stage(stage, out=folder, resume=resume, log=log, **kwargs)
    return folder, time.perf_counter() - t0


def compare(data=None, out=None, preset="tiny", overrides=None, finetune_overrides=None,
            device=None, resamples: int = 1000, seed: int = 0, log=print) -> dict:
    """Run the three stages and the paired test comparison (module docstring)."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks
        log = (lambda *_: None)
    if resamples < 1:
        raise ConfigError(f"--resamples must be positive, not {resamples}")
    cfg = make_config("heated", preset, **{k: v for k, v in (overrides or {}).items()
                                           if v is not None})
    make_config("finetune", preset, **{k: v for k, v in (finetune_overrides or {}).items()
                                       if v is not None})  # its flags checked before any stage
    data = resolve_data(data, (), cfg, log)  # before any training: the test split must exist
    if "test" not in open_source(data).splits:
        raise DataError(f"data at {data} has no test split: compare scores both models on it")
    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("compare under torchrun needs --out (every process must name the same "
                          "folder)")
    out = Path(out) if out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(out, "--out")
    common = dict(preset=preset, data=data, device=device, keep_process_group=True)
    try:
        return _compare(out, common, overrides, finetune_overrides, data, device, resamples,
                        seed, log)
    finally:
        shutdown()  # the process group the stages kept (torchrun)


def _compare(out, common, overrides, finetune_overrides, data, device, resamples, seed, log):
    heated, t_heated = _stage("heated", out / "heated", log, overrides=overrides, **common)
    finetuned, t_finetune = _stage("finetune", out / "finetune", log,
                                   overrides=finetune_overrides,
                                   init_from=heated / "best.pt", **common)
    plain_overrides = {k: v for k, v in (overrides or {}).items()
                       if k not in ("policy_model", "policy_lr", "grid", "impl")}
    baseline, t_baseline = _stage("baseline", out / "baseline", log, overrides=plain_overrides,
                                  **common)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 scores and reports
        return {}
    scored = {}
    for name, folder in (("baseline", baseline), ("pgnm", finetuned)):
        scored[name] = predict_checkpoint(folder / "best.pt", data, "test", device=device,
                                          log=log, show_progress=False)
    (logits_a, labels, _), (logits_b, labels_b, _) = scored["baseline"], scored["pgnm"]
    if not np.array_equal(labels, labels_b):
        raise DataError(f"the baseline in {baseline} and the fine-tuned model in {finetuned} were "
                        f"not scored on the same test images (trained on different data?)")
    metrics = {name: json_safe(classification_metrics(s[0], s[1], s[2])[0])
               for name, s in scored.items()}
    report = {"test": metrics,
              "difference": paired_bootstrap(logits_a, logits_b, labels, resamples, seed),
              "resamples": resamples, "seed": seed,
              "runs": {"heated": str(heated), "finetune": str(finetuned),
                       "baseline": str(baseline)},
              "seconds": {"heated": t_heated, "finetune": t_finetune, "baseline": t_baseline}}
    write_json_atomic(report, out / "compare.json")
    for line in format_report(report):
        log(line)
    log(f"compare: report written to {out / 'compare.json'}")
    return report


def format_report(report: dict) -> list[str]:
    base, pgnm = report["test"]["baseline"], report["test"]["pgnm"]
    lines = [f"test split, {base['n_images']} images: baseline vs PGNM (heated + fine-tuned)",
             f"{'metric':20} {'baseline':>9} {'PGNM':>9}   PGNM - baseline [95% CI], share of "
             f"{report['resamples']} resamples with PGNM ahead"]
    for key in METRIC_KEYS[:-1]:
        a, b = base[key], pgnm[key]
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        row = f"{key:20} {fmt(a):>9} {fmt(b):>9}"
        if key in BOOTSTRAP_KEYS:
            d = report["difference"][key]
            row += (f"   {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], "
                    f"{100 * d['b_ahead']:.0f}%")
        lines.append(row)
    seconds = report["seconds"]
    lines.append("wall time: " + ", ".join(
        f"{k} reused" if not v else f"{k} {v:.0f} s" if v < 120 else f"{k} {v / 60:.1f} min"
        for k, v in seconds.items()))
    return lines
