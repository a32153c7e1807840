"""The lines a run prints: progress-bar fields, step lines for logs, the epoch lines, the resume hint.

The heated stage minimises the objective mean(S) * CE (docs/method.md §5), several times the
cross-entropy, so both are shown and named: ``ce`` reads against the baseline and against chance
(ln C), ``objective`` is what the optimiser sees. Every line fits in 120 columns (paths aside).
"""
from __future__ import annotations

import datetime
import math

WIDTH = 120


def bar_fields(record: dict, heated: bool) -> dict:
    """The progress bar's postfix for a step record."""
    fields = {"ce": f"{record['ce']:.3f}"}
    if heated:
        fields.update(objective=f"{record['loss']:.3f}", S=f"{record['S']:.2f}")
    fields["top1"] = f"{record['train_top1']:.3f}"
    return fields


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def step_line(record: dict, done: int, total: int, elapsed: float, heated: bool) -> str:
    """A log line every --print-freq steps when no live bar is drawn (output not a terminal), as
    torchvision's MetricLogger prints: position, losses, accuracy, speed, time left in the epoch."""
    width = len(str(total))
    eta = elapsed / max(done, 1) * (total - done)
    losses = f"ce {record['ce']:.4f}"
    if heated:
        losses += f"  objective {record['loss']:.4f}  S {record['S']:.3f}"
    return (f"epoch {record['epoch']} [{done:>{width}}/{total}]  {losses}  top1 "
            f"{record['train_top1']:.3f}  {record['img_s']:.0f} img/s  eta {_clock(eta)}")


def format_val(m: dict) -> str:
    """Validation metrics, short names (the JSON keys are in metrics.jsonl)."""
    def f(key):
        value = m.get(key)
        return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
    return (f"top1 {f('top1')}  top5 {f('top5')}  bal_acc {f('balanced_accuracy')}  f1_macro "
            f"{f('f1_macro')}  auc_ovo {f('roc_auc_ovo_macro')}  n {m['n_images']}")


def epoch_lines(epoch: int, epochs: int, stats: dict, val: dict, lr: float, seconds: float,
                val_seconds: float, heated: bool) -> str:
    """Two lines: the epoch's training summary (CE, objective and S when heated, top-1, lr,
    time) and its validation."""
    losses = f"ce {stats['ce']:.4f}"
    if heated:
        losses += f"  objective {stats['loss']:.4f}  S {stats['S']:.3f}"
    first = (f"epoch {epoch}/{epochs - 1}: train {losses}  top1 {stats['train_top1']:.4f}  "
             f"lr {lr:.3g}  {seconds:.1f} s (val {val_seconds:.1f} s)")
    note = " (unconditional masks)" if heated else ""
    return f"{first}\n  val{note}: {format_val(val)}"


def resume_hint(stage: str, last, init_from=None) -> str:
    """What to type to continue an interrupted run (its ``last.pt``)."""
    command = {"heated": "train", "baseline": "train --no-policy",
               "finetune": f"finetune --from {init_from}"}[stage]
    return f"interrupted: continue with  pgnm-fast {command} --resume {last}"
