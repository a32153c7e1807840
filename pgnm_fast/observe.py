"""What a run shows while it trains, written by rank 0 at the end of every epoch.

- the mask gallery of the heated stage (``masks.npz``, drawn as ``masks.png``): a fixed set of
  validation images spread over the classes, and over the modalities when class names carry one
  (``CT__abdomen__normal``), chosen once from the validation order, so every epoch (and a resumed
  run) shows the same images. For each: the policy's expected mask alpha / (alpha + beta) and one
  sampled mask (drawn with a fixed seed on the CPU, outside the training generators), upsampled by
  the masker's matrix form ``A_h m A_w^T`` (docs/method.md §3), and the masked image; plus the
  unconditional mask Beta(exp A_a, exp A_b): its mean and its per-pixel standard deviation
  (exact through the linear upsampling: Var = A_h^2 Var_cells (A_w^2)^T). A ``masks`` record in
  ``metrics.jsonl`` holds the gallery's mean expected mask and mean Beta entropy (nats; 0 is the
  uniform Beta(1, 1), lower is a more certain policy);
- ``per_class.csv`` and ``confusion.csv`` (drawn as ``confusion.png``) whenever the validation
  macro F1 improves, i.e. for the validation of ``best.pt``;
- ``curves.png`` from ``metrics.jsonl`` (:mod:`pgnm_fast.plots`);
- with ``--tensorboard``, the same scalars and the gallery images as TensorBoard events in
  ``RUN/tensorboard``.

A missing matplotlib or tensorboard is reported in one line and the run goes on without them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import plots
from .engine import unwrap
from .kernels.reference import mask_image_matrix, upsample_blur_matrix
from .metrics import per_class_metrics

GALLERY_SIZE = 8


def spread_classes(classes: list[str]) -> list[int]:
    """Class indices ordered to spread over the parts of ``__``-separated names: round-robin over
    the first part (modality), within it over the second (anatomy), and so on."""
    def spread(items, depth):
        groups: dict = {}
        for index, parts in items:
            key = parts[depth] if depth < len(parts) - 1 else index
            groups.setdefault(key, []).append((index, parts))
        if all(len(g) == 1 for g in groups.values()):
            return [g[0][0] for g in groups.values()]
        lists = [spread(g, depth + 1) for g in groups.values()]
        return [q[i] for i in range(max(map(len, lists))) for q in lists if i < len(q)]
    return spread([(i, name.split("__")) for i, name in enumerate(classes)], 0)


def choose_gallery(loader, classes: list[str], size: int = GALLERY_SIZE):
    """(images on the CPU, class indices): the first validation image of each of the first
    ``size`` classes of :func:`spread_classes` that the loader has (the loader's order is fixed)."""
    order = spread_classes(classes)
    wanted = order[:size]
    first: dict[int, torch.Tensor] = {}
    for images, target in loader:
        for j, label in enumerate(target.cpu().tolist()):
            if label not in first:
                first[label] = images[j].detach().float().cpu().clone()
        if all(c in first for c in wanted):
            break
    chosen = [c for c in order if c in first][:size]
    if not chosen:
        return None, []
    return torch.stack([first[c] for c in chosen]), chosen


@torch.no_grad()
def gallery_masks(policy, images: torch.Tensor, grid: int, seed: int = 0) -> dict:
    """The arrays of ``masks.npz`` for ``images`` (B, C, H, W, on the CPU); see the module doc."""
    net = unwrap(policy)
    device = net.base_alpha.device
    was_training = net.training
    net.eval()
    try:
        out = net(images.to(device))
    finally:
        net.train(was_training)
    alpha, beta = out.a_tilde.float().cpu().exp(), out.b_tilde.float().cpu().exp()
    a_h = upsample_blur_matrix(grid, images.shape[-2], dtype=torch.float64)
    a_w = upsample_blur_matrix(grid, images.shape[-1], dtype=torch.float64)

    def up(cells, h=a_h, w=a_w):
        return mask_image_matrix(cells.double(), h, w)[:, 0].float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = torch.distributions.Beta(alpha, beta).sample()
    expected = alpha / (alpha + beta)
    sampled_img = up(sampled)
    ua, ub = net.base_alpha.float().cpu().exp(), net.base_beta.float().cpu().exp()
    u_var = ua * ub / ((ua + ub) ** 2 * (ua + ub + 1))
    u_std = up(u_var, a_h ** 2, a_w ** 2).clamp_min(0).sqrt()
    entropy = torch.distributions.Beta(alpha, beta).entropy()
    return {
        "images": images[:, 0].numpy(), "expected": up(expected).numpy(),
        "sampled": sampled_img.numpy(), "masked": (images[:, 0] * sampled_img).numpy(),
        "uncond_mean": up(ua / (ua + ub))[0].numpy(), "uncond_std": u_std[0].numpy(),
        "mask_mean": float(expected.mean()), "mask_entropy": float(entropy.mean()),
        "uncond_mask_mean": float((ua / (ua + ub)).mean()),
    }


class RunObserver:
    """Rank 0's pictures, tables and TensorBoard events of one stage (see the module doc)."""

    def __init__(self, out: Path, classes: list[str], cfg, write, log):
        self.out, self.classes, self.cfg, self.write, self.log = Path(out), classes, cfg, write, log
        self.plots = True
        self.gallery = None  # (images, class indices), chosen at the first epoch end
        metrics = self.out / plots.METRICS
        self.offset = metrics.stat().st_size if metrics.exists() else 0  # TensorBoard: new records
        self.tb = _summary_writer(self.out / "tensorboard", log) if cfg.tensorboard else None

    def end_epoch(self, epoch: int, step: int, policy=None, val_loader=None, val_scores=None,
                  improved: bool = False) -> None:
        gallery = None
        if policy is not None and val_loader is not None:
            if self.gallery is None:
                self.gallery = choose_gallery(val_loader, self.classes)
            images, chosen = self.gallery
            if images is not None:
                gallery = gallery_masks(policy, images, self.cfg.grid, seed=self.cfg.seed)
                stats = {k: gallery.pop(k) for k in ("mask_mean", "mask_entropy", "uncond_mask_mean")}
                self.write(dict(kind="masks", epoch=epoch, step=step, **stats))
                plots.save_gallery(dict(gallery, classes=np.array([self.classes[c] for c in chosen]),
                                        epoch=np.array(epoch)), self.out / plots.GALLERY)
        if improved and val_scores:
            table, matrix = per_class_metrics(*val_scores)
            plots.write_per_class(table, self.classes, self.out / plots.PER_CLASS)
            plots.write_confusion(matrix, self.classes, self.out / plots.CONFUSION_CSV)
        if self.plots:
            try:
                plots.plot_run(self.out, log=self.log)
            except plots.PlotsUnavailable as e:
                self.log(f"{e}; training goes on")
                self.plots = False
        if self.tb is not None:
            self._tensorboard(gallery, step)

    def _tensorboard(self, gallery, step: int) -> None:
        path = self.out / plots.METRICS
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records, _ = plots.read_lines(complete.splitlines())
        for r in records:
            for tag, value in tensorboard_scalars(r):
                self.tb.add_scalar(tag, value, r.get("step", step))
        if gallery is not None:
            for key in ("images", "expected", "sampled", "masked"):
                x = torch.from_numpy(gallery[key])[:, None]
                if key in ("images", "masked"):  # each image scaled to [0, 1] for display
                    flat = x.flatten(1)
                    lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
                    x = (x - lo) / (hi - lo).clamp_min(1e-6)
                self.tb.add_images(f"masks/{key}", x.clamp(0, 1), step)
            self.tb.add_image("masks/unconditional_mean",
                              torch.from_numpy(gallery["uncond_mean"])[None].clamp(0, 1), step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


STEP_TAGS = {"ce": "train/ce", "loss": "train/objective", "S": "train/S",
             "train_top1": "train/top1", "img_s": "speed/img_s", "lr": "lr/classifier",
             "policy_lr": "lr/policy", "mask_spread": "policy/mask_spread",
             "policy_grad_norm": "policy/grad_norm"}
EPOCH_TAGS = {"train_ce": "epoch/train_ce", "train_loss": "epoch/train_objective",
              "train_S": "epoch/train_S", "train_top1": "epoch/train_top1", "seconds": "epoch/seconds",
              "train_mask_spread": "epoch/mask_spread", "train_policy_grad_norm": "epoch/policy_grad_norm"}
MASK_TAGS = {"mask_mean": "masks/mean", "mask_entropy": "masks/entropy",
             "uncond_mask_mean": "masks/unconditional_mean"}


def tensorboard_scalars(record: dict):
    """(tag, value) pairs of one ``metrics.jsonl`` record."""
    kind = record.get("kind")
    tags = {"step": STEP_TAGS, "epoch": EPOCH_TAGS, "masks": MASK_TAGS}.get(kind, {})
    for key, tag in tags.items():
        if record.get(key) is not None:
            yield tag, float(record[key])
    prefix = {"epoch": "val", "averaged": "averaged_val"}.get(kind)
    if prefix:
        for key, value in (record.get("val") or {}).items():
            if value is not None:
                yield f"{prefix}/{key}", float(value)


def _summary_writer(folder: Path, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
            "training goes on without event files")
        return None
    return SummaryWriter(log_dir=str(folder))
