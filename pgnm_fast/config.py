"""Run configuration: one dataclass, presets for the paper's schedules and a CPU-sized `tiny` run.

Field names follow torchvision's classification reference scripts (``lr_step_size``,
``lr_warmup_epochs``, ``train_crop_size``, ...), which the authors' code forked.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError
from .names import IMPLS, OPTIMIZERS
from .speed import check_flags

STAGES = ("heated", "baseline", "finetune")
MIN_CROP = 8  # smaller crops are narrower than the classifiers' stem padding


@dataclass
class TrainConfig:
    stage: str = "heated"            # heated (policy + masks), baseline (no policy), finetune
    model: str = "resnet50"
    policy_model: str = "resnet10t"
    epochs: int = 90
    batch_size: int = 32             # per process, as torchvision's --batch-size
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_scheduler: str = "steplr"     # steplr | cosineannealinglr | constant
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    lr_warmup_epochs: int = 0
    lr_warmup_decay: float = 0.01    # warm-up starts at lr * lr_warmup_decay
    policy_lr: float | None = None   # default lr / 10, cosine to 0 over the epochs (docs/method.md §5)
    grid: int = 64
    train_crop_size: int = 224
    val_resize_size: int = 256
    val_crop_size: int = 224
    channels: int = 1                # grey data through a 1-channel stem (exact, docs/method.md §1)
    workers: int = 8
    threads: int = 0                 # CPU intra-op threads; 0: the cores other processes leave (the
                                     # count chosen is recorded with the run and kept on resume)
    loader: str = "auto"             # data loading: auto, device, dali, torch (see make_loader)
    on_bad_image: str = "error"      # a file that cannot be used: stop (error) or leave out (skip)
    amp: bool = False
    graphs: bool = False
    channels_last: bool | None = None  # NHWC model and batches; None: on for CUDA (speed.py)
    compile: bool = False            # torch.compile of classifier and policy (speed.py)
    impl: str = "fast"               # mask step: fast (Triton / fused torch) or reference
    sync_bn: bool = True             # SyncBatchNorm when distributed (the authors' setting)
    seed: int = 0
    print_freq: int = 20             # read device-side metrics every N steps
    average_last: int = 0            # also save the mean of the last N epochs' weights (docs/method.md §5)
    tensorboard: bool = False        # also write TensorBoard event files into RUN/tensorboard
    opt: str = "sgd"                 # sgd (the paper's) | adamw, timm's --opt
    label_smoothing: float = 0.0     # cross-entropy label smoothing, timm's --smoothing
    clip_grad_norm: float = 0.0      # max total gradient norm (0: off), clipped on the device
    mean: float | None = None        # input normalisation; None: RadImageNet's grey statistics
    std: float | None = None
    class_balanced: bool = False     # sample train images with weight 1 / class count
    stem_lr_scale: float = 1.0       # 3: a stem summed from 3 channels (pgnm_fast.weights)
    policy_stem_lr_scale: float = 1.0  # the same for the policy's trunk stem
    synth_images: int = 2400         # size of the embedded default data set
    synth_size: int = 96

    @property
    def policy(self) -> bool:
        return self.stage == "heated"

    def effective_policy_lr(self) -> float:
        return self.lr / 10 if self.policy_lr is None else self.policy_lr

    def normalisation(self) -> dict:
        """``mean``/``std`` keyword arguments of the loaders (RadImageNet's where unset)."""
        from .pipelines import MEAN, STD
        return dict(mean=MEAN if self.mean is None else self.mean,
                    std=STD if self.std is None else self.std)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def check(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r} (choose from {', '.join(STAGES)})")
        if self.on_bad_image not in ("error", "skip"):
            raise ConfigError(f"--on-bad-image must be error or skip, not {self.on_bad_image!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"--impl must be one of {', '.join(IMPLS)}, not {self.impl!r}")
        for name in ("epochs", "batch_size", "grid", "train_crop_size", "val_crop_size",
                     "val_resize_size", "print_freq"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if not 0 <= self.average_last <= self.epochs:
            raise ConfigError(f"--average-last must be between 0 and --epochs ({self.epochs}), "
                              f"not {self.average_last}")
        if self.average_last and self.policy:
            raise ConfigError("--average-last applies to the fine-tune and baseline stages: the "
                              "heated classifier goes with its policy")
        if self.threads < 0:
            raise ConfigError(f"--threads must be positive, not {self.threads}")
        self._check_numbers()
        if min(self.train_crop_size, self.val_crop_size) < MIN_CROP:
            flag = "--train-crop-size" if self.train_crop_size < MIN_CROP else "--val-crop-size"
            raise ConfigError(f"{flag} must be at least {MIN_CROP} pixels (the classifier's stem), "
                              f"not {min(self.train_crop_size, self.val_crop_size)}")
        if self.grid > min(self.train_crop_size, self.val_crop_size):
            raise ConfigError(f"--grid {self.grid} is larger than the crop size "
                              f"{min(self.train_crop_size, self.val_crop_size)}")
        if self.val_crop_size > self.val_resize_size:
            raise ConfigError(f"--val-crop-size {self.val_crop_size} exceeds --val-resize-size "
                              f"{self.val_resize_size}")
        check_flags(self.compile, self.graphs)
        if self.channels not in (1, 3):
            raise ConfigError(f"--in-chans must be 1 or 3, not {self.channels}")
        if self.opt not in OPTIMIZERS:
            raise ConfigError(f"--opt must be one of {', '.join(OPTIMIZERS)}, not {self.opt!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.clip_grad_norm < 0:
            raise ConfigError(f"--clip-grad-norm must be >= 0 (0: off), not {self.clip_grad_norm}")
        if self.std is not None and self.std <= 0:
            raise ConfigError(f"--std must be positive, not {self.std}")
        return self

    def _check_numbers(self) -> None:
        """Every numeric flag in its range (one line naming the flag), before anything runs."""
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "lr_warmup_decay", "policy_lr"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{_flag(name)} must be a finite number, not {value}")
        for name in ("lr", "lr_gamma"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, not {getattr(self, name)}")
        if self.policy_lr is not None and self.policy_lr <= 0:
            raise ConfigError(f"--policy-lr must be positive, not {self.policy_lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--wd must be zero or positive, not {self.weight_decay}")
        if self.lr_step_size <= 0:
            raise ConfigError(f"--lr-step-size must be positive, not {self.lr_step_size}")
        if self.lr_warmup_epochs < 0:
            raise ConfigError(f"--lr-warmup-epochs must be zero or positive, not "
                              f"{self.lr_warmup_epochs}")
        if not 0 < self.lr_warmup_decay <= 1:
            raise ConfigError(f"--lr-warmup-decay must be in (0, 1] (the warm-up starts at lr x "
                              f"this factor), not {self.lr_warmup_decay}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2: BatchNorm needs more than one "
                              f"image per batch in training, not {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"-j/--workers must be zero or positive, not {self.workers}")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"--seed must be in [0, 2**32), not {self.seed}")


# The authors' settings (docs/method.md §5): heated and baseline 90 epochs, fine-tune 10 with
# warm-up.
# Their global batch was 8 GPUs x 32 (heated) and 4 x 64 (fine-tune); our batch size is per
# process, so `torchrun --nproc_per_node 8` with the paper preset reproduces it.
PAPER = {
    "heated": dict(model="resnet50", epochs=90, batch_size=32, lr=0.1, lr_scheduler="steplr",
                   lr_step_size=30, lr_gamma=0.1),
    "baseline": dict(model="resnet50", epochs=90, batch_size=32, lr=0.1, lr_scheduler="steplr",
                     lr_step_size=30, lr_gamma=0.1),
    "finetune": dict(model="resnet50", epochs=10, batch_size=64, lr=0.001, lr_scheduler="steplr",
                     lr_step_size=30, lr_gamma=0.1, lr_warmup_epochs=7, lr_warmup_decay=0.01),
}

# Sized for a 2-core CPU in minutes: small crops and grid, the light classifier.
TINY_COMMON = dict(model="resnet10t", batch_size=32, grid=16, train_crop_size=64,
                   val_resize_size=73, val_crop_size=64, workers=2, print_freq=10)
TINY = {
    "heated": dict(TINY_COMMON, epochs=6, lr=0.1, lr_scheduler="cosineannealinglr",
                   lr_warmup_epochs=1, lr_warmup_decay=0.1),
    "baseline": dict(TINY_COMMON, epochs=6, lr=0.1, lr_scheduler="cosineannealinglr",
                     lr_warmup_epochs=1, lr_warmup_decay=0.1),
    "finetune": dict(TINY_COMMON, epochs=2, lr=0.01, lr_scheduler="constant",
                     lr_warmup_epochs=1, lr_warmup_decay=0.01),
}

PRESETS = {"paper": PAPER, "tiny": TINY}


def make_config(stage: str, preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's settings for a stage, then every override that is not None."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r} (choose from {', '.join(PRESETS)})")
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    values = dict(PRESETS[preset][stage], stage=stage)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    return TrainConfig(**values).check()


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a config stored in a checkpoint, ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def _flag(name: str) -> str:
    """The CLI flag of a config field (``weight_decay`` -> ``--wd``)."""
    return {"weight_decay": "--wd", "workers": "-j/--workers"}.get(name, "--" + name.replace("_", "-"))


__all__ = ["TrainConfig", "make_config", "config_from_dict", "PRESETS", "STAGES", "IMPLS",
           "OPTIMIZERS"]
