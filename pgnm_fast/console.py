"""The lines a run prints: progress-bar fields, step lines for logs, the epoch lines, the resume hint.

The heated stage minimises the objective mean(S) * CE (docs/method.md §5), several times the
cross-entropy, so both are shown and named: ``ce`` reads against the baseline and against chance
(ln C), ``objective`` is what the optimiser sees. The heated epoch line is followed by whether the
policy moves (:func:`policy_line`); :class:`DivergenceWatch` warns once when the train CE blows up.
Every line fits in 120 columns (paths aside).
"""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

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
    """The epoch's training summary (CE, objective and S when heated, top-1, lr, time), in the
    heated stage whether the policy moves (:func:`policy_line`), and its validation."""
    losses = f"ce {stats['ce']:.4f}"
    if heated:
        losses += f"  objective {stats['loss']:.4f}  S {stats['S']:.3f}"
    first = (f"epoch {epoch}/{epochs - 1}: train {losses}  top1 {stats['train_top1']:.4f}  "
             f"lr {lr:.3g}  {seconds:.1f} s (val {val_seconds:.1f} s)")
    if heated and "mask_spread" in stats:
        first += "\n" + policy_line(stats)
    note = " (unconditional masks)" if heated else ""
    return f"{first}\n  val{note}: {format_val(val)}"


def policy_line(stats: dict) -> str:
    """Whether the heated stage's policy moves: the spread of its expected mask across images
    (0: every image gets the same mask) and its gradient norm (0: it does not learn)."""
    norm = stats.get("policy_grad_norm")
    norm = "n/a" if norm is None else f"{norm:.3g}"
    return (f"  policy: mask spread {stats['mask_spread']:.4f} (std over images of the mean "
            f"expected mask)  grad norm {norm}")


def resume_hint(stage: str, last, init_from=None) -> str:
    """What to type to continue an interrupted run (its ``last.pt``)."""
    command = {"heated": "train", "baseline": "train --no-policy",
               "finetune": f"finetune --from {init_from}"}[stage]
    return f"interrupted: continue with  pgnm-fast {command} --resume {last}"


# A train CE above either multiple is taken for a diverging run (one warning per run): its
# first-epoch value (the windows of later epochs and every epoch), or chance level ln(classes)
# (every window, the first epoch's too: a classifier that guesses uniformly has CE ln(classes)).
CE_RISE = 3.0
CE_CHANCE = 2.5


class DivergenceWatch:
    """Reads the ``metrics.jsonl`` records of one stage as they are written (:meth:`wrap`) and
    prints one warning line the first time the train CE of a step window or an epoch exceeds
    :data:`CE_RISE` x the first epoch's train CE or :data:`CE_CHANCE` x ln(classes), with the
    step size behind it (mean(S) x lr in the heated stage) and the flag that lowers it."""

    def __init__(self, classes: int, log, heated: bool, flag: str = "--lr",
                 first_epoch: float | None = None):
        self.classes = classes
        self.log, self.heated, self.flag = log, heated, flag
        self.first_epoch = first_epoch  # a resumed run's, from its metrics.jsonl
        self.warned = False

    @staticmethod
    def first_epoch_ce(path) -> float | None:
        """The train CE of the first epoch record in the ``metrics.jsonl`` at ``path`` (a resumed
        run's), or None where there is none yet (unreadable lines are passed over)."""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("kind") == "epoch":
                ce = record.get("train_ce")
                return float(ce) if isinstance(ce, (int, float)) and math.isfinite(ce) else None
        return None

    def wrap(self, write):
        """``write`` that also hands each record to the watch first."""
        def watched(record: dict) -> None:
            self.see(record)
            write(record)
        return watched

    def see(self, record: dict) -> None:
        kind = record.get("kind")
        if kind not in ("step", "epoch"):
            return
        ce, s = (record.get("ce"), record.get("S")) if kind == "step" \
            else (record.get("train_ce"), record.get("train_S"))
        if ce is None or not math.isfinite(ce):
            return
        if not self.warned:
            line = self.check(ce, s, record.get("lr"))
            if line is not None:
                self.warned = True
                self.log(line)
        if kind == "epoch" and self.first_epoch is None:
            self.first_epoch = ce

    def check(self, ce: float, s: float | None, lr: float | None) -> str | None:
        """The warning line for a train CE ``ce``, or None while it stays under both limits."""
        rise = ce / self.first_epoch if self.first_epoch else None
        chance = ce / math.log(self.classes) if self.classes > 1 else None
        if not any(r is not None and r > limit
                   for r, limit in ((rise, CE_RISE), (chance, CE_CHANCE))):
            return None
        parts = [f"{rise:.1f}x first epoch ({self.first_epoch:.2f})"] if rise is not None else []
        if chance is not None:
            parts.append(f"{chance:.1f}x ln({self.classes})")
        if self.heated and s and lr:
            steps = f"mean(S) x lr = {s:.2g} x {lr:.3g}"
        else:
            steps = f"lr {lr:.3g}" if lr else "size"
        return f"warning: train CE {ce:.2f} is {', '.join(parts)}: step {steps} too large, lower {self.flag}"
