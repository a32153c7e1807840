"""The report of `pgnm-fast compare`: ``compare.json``'s content, its printed table and
``compare.png`` (every key: docs/outputs.md).

Intervals: each arm's score gets a t-interval over seeds on the logit scale, the difference
PGNM - baseline the interval over seeds and test images of
:func:`pgnm_fast.metrics.seeds_and_images_interval` (Fisher's z scale), or for ROC-AUC and top-5
a t-interval over seeds on that scale: none leaves the range its metric can reach. Below
:data:`pgnm_fast.metrics.MIN_FOR_INTERVAL` seeds an interval over seeds is not informative (with
2 seeds the t quantile is 12.7): the table then shows each seed's difference and the interval
over test images alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import (
    DIFFERENCE_RANGE,
    METRIC_KEYS,
    MIN_FOR_INTERVAL,
    SCORE_RANGE,
    TOP_K,
    classification_metrics,
    json_safe,
    paired_bootstrap,
    seeds_and_images_interval,
    t_interval,
)

# docs/method.md §6: the authors' RadImageNet test numbers (165 classes, ResNet-50 classifier,
# ResNet-10t policy), printed beside the user's when the data is RadImageNet.
REFERENCE = {
    "source": "authors, RadImageNet 165 classes, ResNet-50 (docs/method.md §6)",
    "baseline": {"precision_macro": 0.5929, "recall_macro": 0.5014, "f1_macro": 0.5226,
                 "roc_auc_ovo_macro": 0.9884, "balanced_accuracy": 0.5014},
    "pgnm": {"precision_macro": 0.6034, "recall_macro": 0.5211, "f1_macro": 0.5468,
             "roc_auc_ovo_macro": 0.9900, "balanced_accuracy": 0.5211},
}
RADIMAGENET_CLASSES = 165
REPORT_KEYS = METRIC_KEYS[:-1]  # every metric but n_images


def report_keys(classes: int) -> tuple[str, ...]:
    """The metrics worth reporting for ``classes`` classes: top-5 only with more than 5 (with
    5 or fewer every image is right in its top 5)."""
    return tuple(k for k in REPORT_KEYS if k != "top5" or classes > TOP_K)


def is_radimagenet(layout: str | None, classes: int) -> bool:
    """Whether the authors' RadImageNet numbers compare with this data: its CSV layout or its
    165 classes."""
    return layout == "radimagenet" or classes == RADIMAGENET_CLASSES


def reference_note(layout: str | None, classes: int) -> str:
    return (f"reference not shown: the authors' numbers ({REFERENCE['source']}) are for "
            f"RadImageNet, and this data ({layout or 'unknown'} layout, {classes} classes) is not")


def _arm_stats(per_seed: dict, seed_list: list, arm: str, keys) -> dict:
    out = {}
    for key in keys:
        values = [per_seed[str(s)]["test"][arm][key] for s in seed_list]
        finite = [v for v in values if v is not None]
        out[key] = {"mean": float(np.mean(finite)) if finite else None,
                    "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
                    "ci95": t_interval(finite, bounds=SCORE_RANGE), "per_seed": values}
    return out


def _seed_only_difference(per_seed: dict, seed_list: list, key: str) -> dict:
    """PGNM - baseline of a metric a reweighting of the images cannot give (ROC-AUC, top-5)."""
    tests = [per_seed[str(s)]["test"] for s in seed_list]
    d = [t["pgnm"][key] - t["baseline"][key] for t in tests
         if None not in (t["pgnm"][key], t["baseline"][key])]
    return {"difference": float(np.mean(d)) if d else None,
            "ci95": t_interval(d, bounds=DIFFERENCE_RANGE), "ci95_images": None,
            "seeds_ahead": int(sum(x > 0 for x in d)), "per_seed": d,
            "method": "t-interval over seeds (test images not resampled), Fisher's z scale"}


def _tidy_seed(entry: dict, keys) -> dict:
    """A seed's record with only the reported metrics and self-explaining bootstrap keys."""
    test = {arm: {k: v for k, v in m.items() if k in keys or k == "n_images"}
            for arm, m in entry["test"].items()}
    boot = {k: {"difference": b["difference"], "ci95": b["ci95"],
                "fraction_of_resamples_pgnm_ahead": b.get("fraction_b_ahead",
                                                          b.get("fraction_of_resamples_pgnm_ahead"))}
            for k, b in entry["bootstrap"].items()}
    return {**entry, "test": test, "bootstrap": boot}


def _epochs(plan: dict | None) -> dict | None:
    if plan is None:  # scored runs: each run's epochs are in ``scored``
        return None
    h, f, b = plan["heated"], plan["finetune"], plan["baseline"]
    return {"pgnm": {"heated": h.epochs, "finetune": f.epochs, "total": h.epochs + f.epochs},
            "baseline": {"total": b.epochs}}


def build_report(per_seed, logits, labels, resamples, seed_list, plan, finetune_from,
                 match_budget, seconds, layout=None, setup=None) -> dict:
    """``compare.json`` (docs/outputs.md) from each seed's record and both arms' test logits.
    ``setup``: ``stage_settings``, ``lr_per_image``, ``arms_differ_in_lr``,
    ``initial_checkpoint`` (``{"path", "sha256"}`` or None) and, for scored runs, ``scored``."""
    setup = {"stage_settings": {}, "lr_per_image": None, "arms_differ_in_lr": False,
             "initial_checkpoint": None, "scored": None, **(setup or {})}
    classes = int(np.asarray(logits["baseline"][0]).shape[1])
    keys = report_keys(classes)
    per_seed = {s: _tidy_seed(e, keys) for s, e in per_seed.items()}
    arms = {arm: _arm_stats(per_seed, seed_list, arm, keys) for arm in ("baseline", "pgnm")}
    difference = seeds_and_images_interval(logits["baseline"], logits["pgnm"], labels,
                                           resamples, seed_list[0])
    for key in difference:
        difference[key]["method"] = ("seeds and test images, Fisher's z scale"
                                     if len(seed_list) > 1
                                     else "paired bootstrap over test images")
    for key in keys:
        if key not in difference:
            difference[key] = _seed_only_difference(per_seed, seed_list, key)
    radimagenet = is_radimagenet(layout, classes)
    return {
        "seeds": seed_list, "n_images": len(labels), "classes": classes, "layout": layout,
        "metrics": list(keys), "test": arms, "difference": difference,
        "interval": "95%: mean over seeds +- t * sqrt(seed variance / N + test-image bootstrap "
                    "variance - interaction counted twice), Welch-Satterthwaite df, on Fisher's "
                    "z scale atanh(d) so it stays in [-1, 1] "
                    "(pgnm_fast.metrics.seeds_and_images_interval)",
        "interval_over_seeds_informative": len(seed_list) >= MIN_FOR_INTERVAL,
        "finetune_from": finetune_from, "match_budget": match_budget,
        "epochs": _epochs(plan),
        "resamples": resamples, **setup, "per_seed": per_seed,
        "reference": REFERENCE if radimagenet else None,
        "reference_note": None if radimagenet else reference_note(layout, classes),
        "seconds": seconds}


def _fmt(v, sign=False):
    return "n/a" if v is None else (f"{v:+.4f}" if sign else f"{v:.4f}")


def _ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "[n/a]"


def _setup_lines(report: dict) -> list[str]:
    """The starting weights, per-stage settings and lr per image, where there are any."""
    lines = []
    start = report.get("initial_checkpoint")
    if start:
        lines.append(f"both arms start from {start['path']} (sha256 {start['sha256']})")
    sets = [f"{stage}.{k}={v}" for stage, kv in (report.get("stage_settings") or {}).items()
            for k, v in kv.items()]
    if sets:
        lines.append("per-stage settings: " + ", ".join(sets))
    lrs = report.get("lr_per_image")
    if lrs:
        lines.append("lr per image: " + ", ".join(f"{k} {v:.4g}" for k, v in lrs.items())
                     + ("; THE ARMS DIFFER IN LR (--allow-unequal-lr): a difference may be the "
                        "lr's, not PGNM's" if report.get("arms_differ_in_lr") else ""))
    return lines


def _scored_header(report: dict) -> list[str]:
    n = len(report["seeds"])
    lines = [f"test split, {report['n_images']} images, {report.get('classes', '?')} classes, "
             f"{n} pair(s) of runs scored as seeds ({', '.join(map(str, report['seeds']))}): "
             f"baseline vs PGNM, no training"]
    for s, pair in zip(report["seeds"], report["scored"]):
        lines.append(f"seed {s}: PGNM " + ", baseline ".join(
            f"{r['checkpoint']} ({r['stage']}, {r['epochs']} epoch{'s' * (r['epochs'] != 1)})"
            for r in (pair["pgnm"], pair["baseline"])))
    return lines


def _header(report: dict) -> list[str]:
    if report.get("scored"):
        return _scored_header(report)
    n, ep = len(report["seeds"]), report["epochs"]
    start = {"last": "the heated stage's last epoch (the authors' protocol)",
             "best": "the heated stage's best.pt (masked validation)"}[report["finetune_from"]]
    return [(f"test split, {report['n_images']} images, {report.get('classes', '?')} classes, "
             f"{n} seed(s) ({', '.join(map(str, report['seeds']))}): baseline vs PGNM "
             f"(heated + fine-tuned)"),
            f"fine-tuned from {start} (--finetune-from {report['finetune_from']})",
            f"epochs in all: PGNM {ep['pgnm']['heated']} heated + {ep['pgnm']['finetune']} "
            f"fine-tune = {ep['pgnm']['total']}, baseline {ep['baseline']['total']}"
            + (" (--match-budget)" if report["match_budget"] else
               " (--match-budget trains it as long)" if ep["baseline"]["total"]
               != ep["pgnm"]["total"] else "")]


def _table(report: dict) -> list[str]:
    n = len(report["seeds"])
    few = 1 < n < MIN_FOR_INTERVAL
    last = ("  seeds PGNM ahead" if n >= MIN_FOR_INTERVAL else "  per seed" if few else "")
    lines = [f"{'metric':18} {'baseline':>16} {'PGNM':>16}   PGNM - baseline "
             + ("[95% CI, test images]" if few else "[95% CI]") + last]
    for key in report.get("metrics", REPORT_KEYS):
        a, b, d = (report["test"]["baseline"][key], report["test"]["pgnm"][key],
                   report["difference"][key])
        cell = (lambda m: _fmt(m["mean"]) + (f" ± {m['sd']:.4f}" if m["sd"] is not None else ""))
        ci = d.get("ci95_images") if few else d["ci95"]
        row = f"{key:18} {cell(a):>16} {cell(b):>16}   {_fmt(d['difference'], True)} {_ci(ci)}"
        if few:
            row += "  " + ", ".join(f"{x:+.4f}" for x in d["per_seed"])
        elif n > 1:
            row += f"  {d['seeds_ahead']} of {len(d['per_seed'])}"
        lines.append(row)
    if few:
        lines += [f"(mean ± sd over seeds; with {n} seeds an interval over seeds is not "
                  f"informative: it needs {MIN_FOR_INTERVAL}+ seeds.",
                  f" The interval shown resamples the {report['n_images']} test images "
                  f"({report['resamples']} resamples) with the seeds fixed; each seed's "
                  f"difference follows it; ROC-AUC and top-5 have no image interval)"]
    elif n > 1:
        lines.append("(mean ± sd over seeds; interval over seeds and test images, "
                     "Welch-Satterthwaite df, Fisher's z scale; top-5 and ROC-AUC over seeds "
                     "only)")
    else:
        lines.append("(interval: paired bootstrap over the test images, "
                     f"{report['resamples']} resamples; ROC-AUC and top-5 need "
                     f"{MIN_FOR_INTERVAL}+ seeds)")
    return lines


def _duration(v: float) -> str:
    return "reused" if not v else f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def _wall_times(seconds: dict) -> list[str]:
    """One line per seed (each stage's training time; "reused": trained by an earlier run), then
    the sum over seeds, so named."""
    lines = [f"wall time, seed {s}: " + ", ".join(f"{k} {_duration(v)}" for k, v in per.items())
             for s, per in seconds.items()]
    total: dict = {}
    for per in seconds.values():
        for stage, v in per.items():
            total[stage] = total.get(stage, 0.0) + v
    if len(seconds) > 1:
        lines.append(f"wall time, summed over the {len(seconds)} seeds: " + ", ".join(
            f"{k} {_duration(v)}" for k, v in total.items()))
    return lines


def format_report(report: dict) -> list[str]:
    """The printed report: setup, the table, the reference line (or why there is none), wall
    times per seed."""
    lines = _header(report) + _setup_lines(report) + _table(report)
    ref = report.get("reference")
    if ref:
        for arm, name in (("baseline", "baseline"), ("pgnm", "PGNM")):
            lines.append(f"reference, {ref['source']}: {name} " + "  ".join(
                f"{k} {v:.4f}" for k, v in ref[arm].items()))
    elif report.get("reference_note"):
        lines.append(report["reference_note"])
    return lines + (_wall_times(report["seconds"]) if report["seconds"] else [])


def chart_intervals(report: dict, keys) -> tuple[dict, np.ndarray]:
    """What ``compare.png`` draws: per arm the (lo, hi) whisker ends of each metric (the mean
    itself when there is no informative interval), and (3, K) rows mid, lo, hi of the
    difference: inside [0, 1] and [-1, 1] by construction."""
    n = len(report["seeds"])
    informative = n >= MIN_FOR_INTERVAL
    arms = {}
    for arm in ("baseline", "pgnm"):
        stats = [report["test"][arm][k] for k in keys]
        arms[arm] = np.array([s["ci95"] if informative and s["ci95"] else [s["mean"]] * 2
                              for s in stats], dtype=float)
    rows = []
    for k in keys:
        d = report["difference"][k]
        ci = d["ci95"] if informative or n == 1 else d.get("ci95_images")
        rows.append([d["difference"]] + (list(ci) if ci else [d["difference"]] * 2))
    return arms, np.array(rows, dtype=float).T


def write_compare_chart(report: dict, path) -> Path | None:
    """``compare.png``: per metric each arm's mean with its 95% interval over seeds and the
    per-seed points (left), the difference PGNM - baseline with its 95% interval (right; over
    test images alone below 3 seeds). None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in report.get("metrics", REPORT_KEYS)
            if report["test"]["baseline"][k]["mean"] is not None]
    whiskers, (mid, lo, hi) = chart_intervals(report, keys)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x, width = np.arange(len(keys)), 0.38
    for j, (arm, label, colour) in enumerate((("baseline", "baseline", "tab:gray"),
                                              ("pgnm", "PGNM (heated + fine-tuned)",
                                               "tab:blue"))):
        pos = x + (j - 0.5) * width
        stats = [report["test"][arm][k] for k in keys]
        means = np.array([s["mean"] for s in stats])
        err = np.stack([means - whiskers[arm][:, 0], whiskers[arm][:, 1] - means])
        ax.bar(pos, means, width, yerr=err, capsize=3, color=colour, alpha=0.7, label=label)
        for p, s in zip(pos, stats):
            pts = [v for v in s["per_seed"] if v is not None]
            ax.scatter(np.full(len(pts), p), pts, s=12, color="black", zorder=3)
    labels = [k.replace("_macro", "").replace("_", " ") for k in keys]
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("test score")
    ax.set_ylim(0, 1.0)
    n = len(report["seeds"])
    what = ("95% interval over seeds" if n >= MIN_FOR_INTERVAL
            else f"no interval over {n} seed(s)")
    ax.set_title(f"{n} seed(s), {report['n_images']} test images: mean, {what}, points = seeds",
                 fontsize=9)
    ax.legend(fontsize=8, loc="best")
    dx.errorbar(mid, x, xerr=[mid - lo, hi - mid], fmt="o", capsize=3, color="tab:blue")
    for i, k in enumerate(keys):
        pts = report["difference"][k]["per_seed"]
        dx.scatter(pts, np.full(len(pts), i), s=10, color="black", zorder=3)
    dx.axvline(0, color="gray", lw=1)
    left, right = dx.get_xlim()
    dx.set_xlim(max(left, -1.0), min(right, 1.0))
    dx.set_yticks(x, labels)
    dx.invert_yaxis()
    dx.set_xlabel("PGNM - baseline\n(95% interval"
                  + ("" if n >= MIN_FOR_INTERVAL or n == 1 else ", test images only")
                  + "; points = seeds)")
    fig.tight_layout()
    from .atomic import atomic_open
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def record_seed(per_seed: dict, logits: dict, seed: int, baseline, pgnm, labels, resamples: int,
                runs: dict) -> None:
    """Seed ``seed``'s part of the report: both arms' test logits into ``logits``, and into
    ``per_seed`` their metrics, the seed's paired bootstrap over the test images and its run
    folders (``runs``)."""
    logits["baseline"].append(baseline)
    logits["pgnm"].append(pgnm)
    per_seed[str(seed)] = {
        "test": {name: json_safe(classification_metrics(x, labels)[0])
                 for name, x in (("baseline", baseline), ("pgnm", pgnm))},
        "bootstrap": paired_bootstrap(baseline, pgnm, labels, resamples, seed),
        "runs": runs}
