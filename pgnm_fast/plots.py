"""Pictures of a run, drawn from the files in its folder (``pgnm-fast plot RUN`` and every epoch).

- ``curves.png`` from ``metrics.jsonl``: train and validation cross-entropy, the heated objective
  mean(S) * CE and S, train/val top-1 and val macro F1, learning rates, img/s over the steps
  (epoch values are marked at the step that ends the epoch), and the mask mean and entropy of the
  heated stage, and whether its policy moves (the spread of the expected mask across images
  and the policy's gradient norm); only the panels the run has data for, every axis labelled;
- ``masks.png`` from ``masks.npz`` (heated stage): the gallery images, the policy's expected mask,
  one sampled mask, the masked image, and the unconditional mask's mean and spread; the title
  gives the expected masks' mean, spread across images and range (flat 0.5: an unmoved policy);
- ``confusion.png`` from ``confusion.csv`` (the best checkpoint's validation; ``per_class.csv``
  beside it holds precision, recall, F1 and support per class).

matplotlib is imported when a picture is drawn, through its object API (``Figure``, no pyplot,
no global backend change, nothing opens a window); without it :class:`PlotsUnavailable` says so in
one line. Files are written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_open
from .errors import PgnmError

METRICS, GALLERY = "metrics.jsonl", "masks.npz"
CURVES, MASKS, CONFUSION = "curves.png", "masks.png", "confusion.png"
CONFUSION_CSV, PER_CLASS = "confusion.csv", "per_class.csv"


class PlotsUnavailable(PgnmError):
    """matplotlib is not installed."""


class DamagedFile(PgnmError):
    """A run file that feeds a picture cannot be read: that picture is left out."""


def _figure(width: float, height: float, layout: str | None = "constrained"):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed: no pictures are drawn "
                               "(pip install matplotlib)") from None
    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a ``metrics.jsonl`` and the number of unreadable lines (a run killed while
    appending can leave a partial last line; a line of other bytes is left out the same way)."""
    return read_lines(Path(path).read_bytes().splitlines())


def parse_record(line: bytes | str) -> dict | None:
    """One ``metrics.jsonl`` line as its record; None when it is not UTF-8 JSON holding an
    object (a partial line, other bytes, an array)."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_lines(lines: list[bytes | str]) -> tuple[list[dict], int]:
    records = [r for r in map(parse_record, lines) if r is not None]
    return records, sum(1 for line in lines if line.strip()) - len(records)


def _series(records, kind, key, sub=None):
    """(steps, values) of ``key`` (or ``record[sub][key]``) over the records of ``kind``."""
    xs, ys = [], []
    for r in records:
        if r.get("kind") != kind:
            continue
        value = (r.get(sub) or {}).get(key) if sub else r.get(key)
        if value is not None and "step" in r:
            xs.append(r["step"])
            ys.append(value)
    return np.asarray(xs), np.asarray(ys, dtype=np.float64)


def _line(ax, records, kind, key, label, sub=None, **style):
    x, y = _series(records, kind, key, sub)
    if len(x):
        if kind != "step":
            style.setdefault("marker", "o")
        ax.plot(x, y, label=label, **style)
    return len(x) > 0


def _has(records, kind, key, sub=None) -> bool:
    return len(_series(records, kind, key, sub)[0]) > 0


def _twin(ax, records, kind, key, label, ylabel, **style):
    """``key`` on a right-hand axis of ``ax``; one legend for both axes."""
    twin = ax.twinx()
    _line(twin, records, kind, key, label, **style)
    twin.set_ylabel(ylabel)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8)


def _loss_panel(ax, records):
    _line(ax, records, "step", "ce", "train CE (steps)", lw=0.8, alpha=0.6)
    _line(ax, records, "epoch", "train_ce", "train CE (epoch)")
    _line(ax, records, "epoch", "loss", "val CE", sub="val")
    ax.set(title="cross-entropy", ylabel="cross-entropy (nats)")
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [[1.0]])
    if np.all(values > 0) and values.max() / values.min() > 30:
        ax.set_yscale("log")  # a diverging validation CE beside the train CE


def _objective_panel(ax, records):
    _line(ax, records, "step", "loss", "objective mean(S) x CE", lw=0.8, color="C3")
    ax.set(title="heated objective and S", ylabel="objective mean(S) x CE")
    _twin(ax, records, "step", "S", "S (right axis)", "S", lw=0.8, color="C4")


def _accuracy_panel(ax, records):
    _line(ax, records, "step", "train_top1", "train top-1 (steps)", lw=0.8, alpha=0.6)
    _line(ax, records, "epoch", "train_top1", "train top-1 (epoch)")
    _line(ax, records, "epoch", "top1", "val top-1", sub="val")
    _line(ax, records, "epoch", "f1_macro", "val macro F1", sub="val")
    ax.set(title="accuracy", ylabel="top-1 / macro F1", ylim=(-0.02, 1.02))


def _lr_panel(ax, records):
    _line(ax, records, "step", "lr", "classifier lr")
    _line(ax, records, "step", "policy_lr", "policy lr")
    ax.set(title="learning rates", ylabel="learning rate")
    lrs = [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]
    if lrs and all(np.all(y > 0) for y in lrs) and max(y.max() / y.min() for y in lrs) > 1.01:
        ax.set_yscale("log")  # step decay reads as equal steps


def _speed_panel(ax, records):
    _line(ax, records, "step", "img_s", "img/s (per process)", lw=0.8)
    ax.set(title="throughput", ylabel="images / s per process")


def _mask_panel(ax, records):
    _line(ax, records, "masks", "mask_mean", "mean expected mask", color="C0")
    ax.set(title="policy masks (gallery images)", ylabel="mean expected mask", ylim=(-0.02, 1.02))
    _twin(ax, records, "masks", "mask_entropy", "mean Beta entropy (right)",
          "mean Beta entropy (nats)", color="C1")


def _policy_panel(ax, records):
    _line(ax, records, "step", "mask_spread", "mask spread (steps)", lw=0.8, color="C0")
    _line(ax, records, "epoch", "train_mask_spread", "mask spread (epoch)", color="C0")
    ax.set(title="does the policy move?", ylabel="std over images of mean expected mask")
    _twin(ax, records, "step", "policy_grad_norm", "policy gradient norm (right)",
          "policy gradient 2-norm", lw=0.8, color="C1")


def curve_panels(records: list[dict]) -> list:
    """The panels the records have data for: a fine-tune or baseline run has no objective and no
    masks; cross-entropy is always drawn (empty only for a log with no record yet)."""
    heated = any(r.get("kind") == "step" and r.get("S", 0) > 0 for r in records)
    return [_loss_panel] + [panel for panel, present in (
        (_objective_panel, heated),
        (_accuracy_panel, any(_has(records, k, key, sub) for k, key, sub in (
            ("step", "train_top1", None), ("epoch", "train_top1", None), ("epoch", "top1", "val")))),
        (_lr_panel, _has(records, "step", "lr")),
        (_speed_panel, _has(records, "step", "img_s")),
        (_mask_panel, _has(records, "masks", "mask_mean")),
        (_policy_panel, _has(records, "step", "mask_spread")),
    ) if present]


def curves_figure(records: list[dict], title: str = ""):
    """The figure of ``curves.png``: one panel per quantity the run has, over the global step;
    thin lines are the per-window step records, markers the epoch records, grey lines epoch ends.
    Every axis is labelled."""
    panels = curve_panels(records)
    cols = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig = _figure(5 * cols, 4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ends = [r["step"] for r in records if r.get("kind") == "epoch"]
    for ax, panel in zip(axes, panels):
        panel(ax, records)
        ax.set_xlabel("step")
        for end in ends:
            ax.axvline(end, color="0.85", lw=0.6, zorder=0)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle(title + ("  (grey lines: epoch ends)" if ends else ""))
    return fig


def draw_curves(records: list[dict], path: Path, title: str = "") -> Path:
    """``curves.png`` (:func:`curves_figure`)."""
    return _save(curves_figure(records, title), path)


def _short(name: str) -> str:
    return name.replace("__", "\n")


def draw_masks(gallery: dict, path: Path) -> Path:
    """``masks.png``: one column per gallery image; rows: image, expected mask, sampled mask,
    masked image; a last row with the unconditional mask's mean and spread."""
    images, names = gallery["images"], [str(n) for n in gallery["classes"]]
    n = len(images)
    cols = max(n, 2)
    fig = _figure(1.6 * cols + 1.4, 1.75 * 5 + 0.8, layout=None)  # placed by hand: colour bars
    axes = fig.subplots(5, cols, squeeze=False, gridspec_kw={
        "left": 0.07, "right": 0.9, "top": 0.9, "bottom": 0.02, "wspace": 0.08, "hspace": 0.3})
    rows = [("image", "images", "gray", None), ("expected mask\nalpha/(alpha+beta)", "expected",
                                                   "viridis", (0, 1)),
            ("one sampled mask", "sampled", "viridis", (0, 1)), ("masked image", "masked", "gray", None)]
    mask_im = None
    for r, (label, key, cmap, lim) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= n:
                ax.set_axis_off()
                continue
            vmin, vmax = lim if lim else (float(images[c].min()), float(images[c].max()))
            im = ax.imshow(gallery[key][c], cmap=cmap, vmin=vmin, vmax=vmax)
            if lim:
                mask_im = im
            if r == 0:
                ax.set_title(_short(names[c]), fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    for c in range(cols):
        axes[4, c].set_axis_off()
    for c, (key, label) in enumerate((("uncond_mean", "unconditional mask\nmean"),
                                      ("uncond_std", "unconditional mask\nstd (spread)"))):
        ax = axes[4, c]
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        im = ax.imshow(gallery[key], cmap="viridis" if c == 0 else "magma",
                       vmin=0, vmax=1 if c == 0 else None)
        ax.set_title(label, fontsize=8)
        if c == 1:  # the mean shares the masks' colour bar; the spread has its own scale
            fig.colorbar(im, cax=ax.inset_axes([1.04, 0.0, 0.07, 1.0]))
    if mask_im is not None:
        fig.colorbar(mask_im, cax=fig.add_axes([0.92, 0.42, 0.012, 0.3]), label="mask value")
    fig.suptitle(f"policy masks after epoch {int(gallery['epoch'])} (the same validation images "
                 f"every epoch)\n{_flatness(gallery['expected'])}", fontsize=10)
    return _save(fig, path)


def _flatness(expected) -> str:
    """Whether the expected masks say anything: their mean, the spread of the per-image means
    across the gallery, and their range (a policy that has not moved gives 0.5 everywhere)."""
    expected = np.asarray(expected, dtype=np.float64)
    per_image = expected.reshape(len(expected), -1).mean(1)
    return (f"expected mask: mean {expected.mean():.3f}, spread across images {per_image.std():.4f}, "
            f"range {expected.min():.3f} to {expected.max():.3f}")


def draw_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """``confusion.png``: rows normalised to recall (colour), counts written in small grids."""
    matrix = np.asarray(matrix)
    k = len(classes)
    side = min(4 + 0.45 * k, 30)
    fig = _figure(side + 2, side)
    ax = fig.subplots()
    support = matrix.sum(1, keepdims=True)
    recall = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=float), where=support > 0)
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if k <= 60:
        ticks = np.arange(k)
        ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, classes, fontsize=7)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if recall[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def write_per_class(table: dict, classes: list[str], path: Path) -> Path:
    """``per_class.csv``: class, precision, recall, f1, support (the output of
    :func:`pgnm_fast.metrics.per_class_metrics`)."""
    with atomic_open(path, "w") as f:
        out = csv.writer(f)
        out.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(classes):
            out.writerow([name, f"{table['precision'][i]:.4f}", f"{table['recall'][i]:.4f}",
                          f"{table['f1'][i]:.4f}", int(table["support"][i])])
    return Path(path)


def write_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """``confusion.csv``: counts, rows the true class, columns the predicted class."""
    with atomic_open(path, "w") as f:
        out = csv.writer(f)
        out.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, np.asarray(matrix)):
            out.writerow([name, *map(int, row)])
    return Path(path)


def read_confusion(path: Path) -> tuple[np.ndarray, list[str]]:
    """The counts and class names of a ``confusion.csv``; :class:`DamagedFile` naming the file
    and the row when it is not a header plus one row of counts per class."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DamagedFile(f"{path} is unreadable ({e})") from None
    if not rows or len(rows[0]) < 2:
        raise DamagedFile(f"{path} has no header row of class names")
    classes = rows[0][1:]
    if len(rows) - 1 != len(classes):
        raise DamagedFile(f"{path} has {len(rows) - 1} rows of counts, expected {len(classes)} "
                          f"(one per class)")
    for i, row in enumerate(rows[1:], 2):
        if len(row) != len(classes) + 1 or not all(v.strip().isdigit() for v in row[1:]):
            raise DamagedFile(f"{path}: row {i} is not a class name and {len(classes)} counts")
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]]), classes


def save_gallery(gallery: dict, path: Path) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **gallery)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return Path(path)


GALLERY_KEYS = ("images", "expected", "sampled", "masked", "classes", "epoch", "uncond_mean",
                "uncond_std")


def load_gallery(path: Path) -> dict:
    """The arrays of a ``masks.npz``; :class:`DamagedFile` naming the file and the key when it
    is unreadable, truncated or lacks one."""
    import zipfile
    try:
        with np.load(path, allow_pickle=False) as data:
            gallery = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DamagedFile(f"{path} is unreadable or truncated ({str(e)[:100]})") from None
    missing = [k for k in GALLERY_KEYS if k not in gallery]
    if missing:
        raise DamagedFile(f"{path} lacks {', '.join(repr(k) for k in missing)}")
    n = len(gallery["images"])
    for key in ("expected", "sampled", "masked", "classes"):
        if len(gallery[key]) != n:
            raise DamagedFile(f"{path}: '{key}' holds {len(gallery[key])} entries, expected {n} "
                              f"(one per image)")
    return gallery


def plot_run(folder, log=print) -> list[Path]:
    """Draw every picture the files of run ``folder`` allow; returns the paths written."""
    folder = Path(folder)
    if not (folder / METRICS).is_file():
        what = "does not exist" if not folder.exists() else f"is not a run folder (no {METRICS})"
        raise PgnmError(f"{folder} {what}")
    records, bad = read_records(folder / METRICS)
    if bad:
        log(f"{folder / METRICS}: left out {bad} unreadable line(s)")
    written = [draw_curves(records, folder / CURVES, title=_title(folder))]
    pictures = [(GALLERY, MASKS, lambda p: draw_masks(load_gallery(p), folder / MASKS)),
                (CONFUSION_CSV, CONFUSION, lambda p: draw_confusion(
                    *read_confusion(p), folder / CONFUSION, _confusion_title(records)))]
    for name, picture, draw in pictures:
        if (folder / name).is_file():
            try:
                written.append(draw(folder / name))
            except DamagedFile as e:
                log(f"{e}: {picture} not drawn")
    return written


def _title(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        return f"{folder.name}: {cfg.get('stage', '?')} stage, {cfg.get('model', '?')}"
    except (OSError, ValueError):
        return folder.name


def _confusion_title(records: list[dict]) -> str:
    """The epoch of the best validation macro F1 (the epoch best.pt holds)."""
    best = None
    for r in records:
        val = r.get("val") if r.get("kind") == "epoch" else None
        f1 = val.get("f1_macro") if isinstance(val, dict) else None
        if isinstance(f1, (int, float)) and not math.isnan(f1) and (best is None or f1 > best[1]):
            best = (r["epoch"], f1)
    if best is None:
        return "validation confusion matrix"
    return f"validation confusion matrix of best.pt (epoch {best[0]}, macro F1 {best[1]:.4f})"
