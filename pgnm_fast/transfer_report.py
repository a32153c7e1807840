"""The report of `pgnm-fast transfer`: ``transfer.json``'s summaries, the printed tables and
``transfer.png`` (every key: docs/outputs.md).

Per checkpoint and n: the mean score over repeats with a 95% t-interval over repeats on the logit
scale (inside [0, 1]). Per checkpoint other than the reference (the first ``--from``, or
``--reference LABEL``) and n: the paired difference checkpoint - reference, repeat by repeat
(both trained on the same subset), its mean and a 95% t-interval over repeats on Fisher's z
scale (inside [-1, 1]). Below :data:`pgnm_fast.metrics.MIN_FOR_INTERVAL` repeats an interval
over repeats is not informative: the tables show each repeat's value instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import DIFFERENCE_RANGE, MIN_FOR_INTERVAL, SCORE_RANGE, t_interval

SCORE_KEYS = ("f1_macro", "balanced_accuracy", "roc_auc_ovo_macro", "top1")
TABLE_KEYS = SCORE_KEYS[:3]


def summarise(runs: list[dict]) -> dict:
    """``{checkpoint: {n: {metric: {"mean", "ci95", "values"}}}}`` over repeats."""
    out: dict = {}
    for run in runs:
        cell = out.setdefault(run["checkpoint"], {}).setdefault(str(run["n"]), {})
        for key in SCORE_KEYS:
            cell.setdefault(key, {"values": []})["values"].append(run[key])
    for cells in out.values():
        for cell in cells.values():
            for stat in cell.values():
                v = [x for x in stat["values"] if x is not None]
                stat["mean"] = float(np.mean(v)) if v else None
                stat["ci95"] = t_interval(v, bounds=SCORE_RANGE)
    return out


def paired_differences(runs: list[dict], reference: str) -> dict:
    """``{checkpoint: {n: {metric: {"difference", "ci95", "per_repeat", "repeats"}}}}``: each
    checkpoint's score minus ``reference``'s on the same (n, repeat) subset, the mean over the
    repeats both have, and its 95% t-interval over repeats (Fisher's z scale)."""
    by_key = {(r["checkpoint"], int(r["n"]), int(r["repeat"])): r for r in runs}
    out: dict = {}
    for (name, n, rep), run in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        ref = by_key.get((reference, n, rep))
        if name == reference or ref is None:
            continue
        cell = out.setdefault(name, {}).setdefault(str(n), {})
        for key in SCORE_KEYS:
            stat = cell.setdefault(key, {"per_repeat": [], "repeats": []})
            if run[key] is not None and ref[key] is not None:
                stat["per_repeat"].append(run[key] - ref[key])
                stat["repeats"].append(rep)
    for cells in out.values():
        for cell in cells.values():
            for stat in cell.values():
                d = stat["per_repeat"]
                stat["difference"] = float(np.mean(d)) if d else None
                stat["ci95"] = t_interval(d, bounds=DIFFERENCE_RANGE)
    return out


def summaries(runs: list[dict], reference: str) -> dict:
    """The report's ``summary``, ``reference`` and ``differences`` keys."""
    return {"summary": summarise(runs), "reference": reference,
            "differences": paired_differences(runs, reference)}


def _cell(stat: dict, value_key: str, values_key: str, sign: bool) -> str:
    m, ci = stat[value_key], stat["ci95"]
    fmt = "{:+.4f}" if sign else "{:.4f}"
    text = "n/a" if m is None else fmt.format(m)
    values = [x for x in stat[values_key] if x is not None]
    if len(values) < MIN_FOR_INTERVAL:  # no informative interval: the repeats themselves
        return f"{text} (" + ", ".join(fmt.format(x) for x in values) + ")"
    return f"{text} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def format_table(report: dict) -> list[str]:
    """The scores per checkpoint and n, then each checkpoint's paired difference against the
    reference."""
    repeats = report["settings"]["repeats"]
    few = repeats < MIN_FOR_INTERVAL
    what = "(each repeat)" if few else "[95% CI]"
    lines = [f"{'checkpoint':24} {'n':>5}  " + "  ".join(f"{k + ' ' + what:>32}"
                                                          for k in TABLE_KEYS)]
    for name, cells in report["summary"].items():
        for n, cell in cells.items():
            lines.append(f"{name:24} {n:>5}  " + "  ".join(
                f"{_cell(cell[k], 'mean', 'values', False):>32}" for k in TABLE_KEYS))
    ref = report.get("reference")
    diffs = report.get("differences") or {}
    if diffs:
        lines.append(f"paired difference against {ref} (same subsets, repeat by repeat):")
        for name, cells in diffs.items():
            for n, cell in cells.items():
                lines.append(f"{name + ' - ' + ref:24} {n:>5}  " + "  ".join(
                    f"{_cell(cell[k], 'difference', 'per_repeat', True):>32}"
                    for k in TABLE_KEYS))
    lines.append(f"(mean over {repeats} repeats; n = training images in all, class-stratified;")
    lines.append(f" with {repeats} repeats an interval over repeats is not informative (it needs "
                 f"{MIN_FOR_INTERVAL}+): each repeat's value in brackets)" if few else
                 " 95% t-interval over repeats, logit scale for scores, Fisher's z for "
                 "differences)")
    return lines


def score_limits(lo: float, hi: float) -> tuple[float, float]:
    """A score axis from matplotlib's automatic limits: inside [0, 1] (a little headroom above
    for the points), at least 0.1 tall, so that equal scores (all 1.0) still show a line."""
    hi = min(1.0, hi)
    return max(0.0, min(lo, hi - 0.1)), hi + 0.02


def _band(ax, ns, stats, value_key, colour):
    """The mean line and, with an informative interval, its 95% band."""
    mid = np.array([np.nan if s[value_key] is None else s[value_key] for s in stats])
    ax.plot(ns, mid, "o-", color=colour, ms=4)
    for n, s in zip(ns, stats):  # the repeats as points
        pts = [v for v in s.get("values", s.get("per_repeat", [])) if v is not None]
        ax.scatter(np.full(len(pts), n), pts, s=6, color=colour, alpha=0.4)
    ci = [s["ci95"] for s in stats]
    if all(c is not None for c in ci) and all(
            len(s.get("values", s.get("per_repeat"))) >= MIN_FOR_INTERVAL for s in stats):
        ax.fill_between(ns, [c[0] for c in ci], [c[1] for c in ci], color=colour, alpha=0.2)


def write_transfer_chart(report: dict, path) -> Path | None:
    """``transfer.png``: top row, macro F1, balanced accuracy and ROC-AUC against n (log axis),
    one line with its 95% band per checkpoint; bottom row (two or more checkpoints), each
    checkpoint's paired difference against the reference with its band, which stays readable
    with many checkpoints. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(report["summary"])
    diffs = report.get("differences") or {}
    rows = 2 if diffs else 1
    fig, axes = plt.subplots(rows, len(TABLE_KEYS), figsize=(5 * len(TABLE_KEYS), 4 * rows),
                             squeeze=False)
    colour = {name: f"C{j % 10}" for j, name in enumerate(names)}
    for ax, key in zip(axes[0], TABLE_KEYS):
        for name, cells in report["summary"].items():
            ns = np.array([int(n) for n in cells])
            _band(ax, ns, [cells[n][key] for n in cells], "mean", colour[name])
            ax.plot([], [], "o-", color=colour[name], label=name)
        ax.set_ylabel(key.replace("_", " "))
        ax.set_ylim(*score_limits(*ax.get_ylim()))
    for ax, key in zip(axes[1] if diffs else [], TABLE_KEYS):
        for name, cells in diffs.items():
            ns = np.array([int(n) for n in cells])
            _band(ax, ns, [cells[n][key] for n in cells], "difference", colour[name])
        ax.axhline(0, color=colour.get(report["reference"], "gray"), lw=1)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, -1.0), min(hi, 1.0))
        ax.set_ylabel(f"{key.replace('_', ' ')}: minus {report['reference']}")
    for ax in axes.ravel():
        ax.set_xscale("log", base=2)
        ns = sorted({int(n) for cells in report["summary"].values() for n in cells})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("training images n (class-stratified)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"few-shot transfer to {len(s['classes'])} classes: mean over {s['repeats']} "
                 f"repeats, 95% band with 3+ repeats "
                 f"({'probe' if s['probe'] else 'fine-tune'}, {s['steps']} steps)", fontsize=10)
    fig.tight_layout()
    from .atomic import atomic_open
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
