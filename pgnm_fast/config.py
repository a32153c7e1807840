"""Run configuration: one dataclass, presets for the paper's schedules and a CPU-sized `tiny` run.

Field names follow torchvision's classification reference scripts (``lr_step_size``,
``lr_warmup_epochs``, ``train_crop_size``, ...), which the authors' code forked. Each field's
metadata holds its command-line option (names, help, range rule): :mod:`pgnm_fast.options` builds
the options of `train`, `finetune` and `compare` from it and writes ``docs/flags.md``.
No torch import here: ``pgnm-fast --help`` reads this module.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .batching import resolve_batch, shorten_warmup
from .errors import ConfigError
from .names import IMPLS, LOADERS, MODELS, OPTIMIZERS, SCHEDULERS

STAGES = ("heated", "baseline", "finetune")
MIN_CROP = 8  # smaller crops are narrower than the classifiers' stem padding
CROP_RATIO = 0.875  # --img-size N: val resize round(N / 0.875), torchvision's and timm's ratio

# range rules of numeric settings: (test, what the value must be); floats must also be finite
RULES = {
    "positive": (lambda v: v > 0, "positive"),
    "non_negative": (lambda v: v >= 0, "zero or positive"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "unit": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "batch": (lambda v: v >= 2, "at least 2 (BatchNorm needs more than one image per batch in "
                                "training)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "finite": (lambda v: True, "finite"),
}


def check_value(name: str, value, rule: str) -> None:
    """One line naming ``name`` when ``value`` breaks ``rule`` (a key of :data:`RULES`)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value}")
    test, text = RULES[rule]
    if not test(value):
        raise ConfigError(f"{name} must be {text}, not {value}")


def setting(default, help: str, *flags: str, rule: str | None = None, choices=None,
            metavar: str | None = None, heated_only: bool = False, default_text: str | None = None,
            cli: bool = True):
    """A TrainConfig field and its command-line option. ``flags``: the option's names (default
    ``--field-name``; a boolean gets ``--x/--no-x`` unless its names are given); ``rule``: its
    range (:data:`RULES`); ``heated_only``: an option of `train`, not `finetune`;
    ``default_text``: the default as shown where the value itself says little; ``cli=False``: a
    key of ``--config`` files and run records without a flag."""
    return dataclasses.field(default=default, metadata=dict(
        flags=flags, help=help, rule=rule, choices=choices, metavar=metavar,
        heated_only=heated_only, default_text=default_text, cli=cli))


# a field declared without setting(): a --config key without a flag, help or range rule
PLAIN = dict(flags=(), help="", rule=None, choices=None, metavar=None, heated_only=False,
             default_text=None, cli=False)


def meta(name: str) -> dict:
    """The option metadata of the field ``name`` (:func:`setting`)."""
    return {**PLAIN, **FIELDS[name].metadata}


@dataclass
class TrainConfig:
    stage: str = setting("heated", "Heated, baseline or finetune: set by the command "
                         "(train, train --no-policy, finetune).", cli=False)
    model: str = setting("resnet50", "Classifier.", choices=MODELS)
    policy_model: str = setting("resnet10t", "The policy network's trunk.", choices=MODELS,
                                heated_only=True)
    epochs: int = setting(90, "Epochs in all (a resumed run continues to this count).",
                          rule="positive")
    global_batch: int = setting(32, "Images per optimiser step over every process and "
                                "accumulation step; the preset's lr is for its own (a new one "
                                "scales --lr-base, unless --lr is given).", rule="batch")
    batch_size: int | None = setting(None, "Images per process per forward pass (torchrun: per "
                                     "GPU); smaller than --global-batch / processes: gradients "
                                     "accumulate over --accum-steps of them.", "-b",
                                     "--batch-size", rule="batch",
                                     default_text="--global-batch / processes")
    accum_steps: int | None = setting(None, "Micro-batches whose gradients make one optimiser "
                                      "step: --global-batch / (--batch-size x processes).",
                                      "--accum-steps", "--grad-accum-steps", rule="positive",
                                      default_text="derived")
    lr: float | None = setting(None, "Peak learning rate of the classifier (wins over "
                               "--lr-base).", rule="positive",
                               default_text="--lr-base at --global-batch")
    lr_base: float = setting(0.1, "Peak learning rate for --lr-base-size images per step; scaled "
                             "to --global-batch by --lr-base-scale.", rule="positive")
    lr_base_size: int = setting(256, "The global batch --lr-base is for.", rule="positive")
    lr_base_scale: str = setting("linear", "How --lr-base scales with --global-batch / "
                                 "--lr-base-size (timm's rule).", choices=("linear", "sqrt"))
    reward_group: int | None = setting(None, "Heated: the objective is the mean over groups of "
                                       "this many images of mean(S) x CE (the authors' per-GPU "
                                       "batch); must divide --batch-size (none: each "
                                       "micro-batch one group).", rule="positive",
                                       heated_only=True,
                                       default_text="paper 32, tiny the micro-batch")
    momentum: float = setting(0.9, "SGD momentum (classifier and policy).", rule="fraction")
    weight_decay: float = setting(1e-4, "Weight decay (classifier and policy).", "--wd",
                                  "--weight-decay", rule="non_negative")
    lr_scheduler: str = setting("steplr", "Learning-rate schedule after the warm-up.",
                                choices=SCHEDULERS)
    lr_step_size: int = setting(30, "steplr: epochs between decays.", rule="positive")
    lr_gamma: float = setting(0.1, "steplr: factor of each decay.", rule="positive")
    lr_warmup_epochs: int = setting(0, "Epochs of linear warm-up (0: none).", rule="non_negative")
    lr_warmup_decay: float = setting(0.01, "The warm-up starts at --lr times this factor.",
                                     rule="unit")
    policy_lr: float | None = setting(None, "Policy learning rate, cosine to 0 over the epochs "
                                      "(docs/method.md §5).", rule="positive", heated_only=True,
                                      default_text="--lr / 10")
    grid: int = setting(64, "Mask grid G (G x G cells); at most the crop size.", rule="positive",
                        heated_only=True)
    train_crop_size: int = setting(224, "Side of the random crop a training image is scaled to.",
                                   rule="positive")
    val_resize_size: int = setting(256, "Validation: shorter side resized to this, then centre "
                                   "cropped.", rule="positive")
    val_crop_size: int = setting(224, "Validation: side of the centre crop.", rule="positive")
    channels: int = setting(1, "Classifier input channels: 1 (grey) or 3 (the grey image "
                            "replicated, the authors' form). A 3-channel checkpoint on a 1-channel "
                            "run has its stem summed and trained with lr x3, weight decay /3: "
                            "the same SGD/AdamW steps as the 3-channel stem.", "--in-chans",
                            choices=("1", "3"))
    workers: int = setting(8, "Data-loading processes (plain loader) or DALI CPU threads.", "-j",
                           "--workers", rule="non_negative")
    threads: int = setting(0, "CPU runs: intra-op threads (0: the cores less those other "
                           "processes keep busy, at least 1; the count chosen is recorded with "
                           "the run and kept on resume).", metavar="N", rule="non_negative",
                           default_text="auto")
    loader: str = setting("auto", "Data loading: a packed cache held in device memory (device), "
                          "DALI (GPU or CPU-only), the plain PyTorch loader, or auto: device for "
                          "a packed cache that fits on the GPU, else DALI where it is installed.",
                          choices=LOADERS)
    on_bad_image: str = setting("error", "A file that cannot be used (checked before the first "
                                "epoch): stop naming it, or leave it out and say how many.",
                                choices=("error", "skip"))
    amp: bool = setting(False, "bf16 autocast (CUDA or CPU).")
    graphs: bool = setting(False, "CUDA-graph-captured step (GPU).")
    channels_last: bool | None = setting(None, "NHWC model and batches.",
                                         default_text="on for CUDA, off on the CPU")
    compile: bool = setting(False, "torch.compile the classifier and policy (not with --graphs).",
                            "--compile", "--torchcompile")
    impl: str = setting("fast", "Mask step implementation: fast (Triton / fused torch) or "
                        "reference.", choices=IMPLS, heated_only=True)
    sync_bn: bool = setting(True, "SyncBatchNorm under torchrun (the authors' setting).")
    seed: int = setting(0, "Seed of the data order, masks and initialisation.", rule="seed")
    print_freq: int = setting(20, "Log (and read device-side metrics) every N steps.",
                              metavar="N", rule="positive")
    average_last: int = setting(0, "Also write averaged.pt: the weights averaged over the last N "
                                "epochs (fine-tune and --no-policy baseline; the paper's option "
                                "is 3; 0: off; at most --epochs).", metavar="N")
    tensorboard: bool = setting(False, "Also write TensorBoard event files (scalars, mask images) "
                                "to RUN/tensorboard (needs the tensorboard package).")
    opt: str = setting("sgd", "Classifier optimiser (sgd with --momentum is the paper's; the "
                       "policy always uses SGD).", choices=OPTIMIZERS)
    label_smoothing: float = setting(0.0, "Cross-entropy label smoothing (0: off, the paper's).",
                                     rule="fraction")
    clip_grad_norm: float = setting(0.0, "Clip each network's gradient 2-norm to MAX (0: off), on "
                                    "the device.", metavar="MAX", rule="non_negative")
    mean: float | None = setting(None, "Input normalisation mean on [0, 1] pixels.",
                                 rule="finite", default_text="RadImageNet's")
    std: float | None = setting(None, "Input normalisation std.", rule="positive",
                                default_text="RadImageNet's")
    class_balanced: bool = setting(False, "Draw training images with weight 1 / class size "
                                   "(imbalanced sets); deterministic by --seed, sharded under "
                                   "torchrun.")
    stem_lr_scale: float = setting(1.0, "Learning-rate scale of a stem summed from 3 channels "
                                   "(3), set from the initial weights.", cli=False, rule="positive")
    policy_stem_lr_scale: float = setting(1.0, "Learning-rate scale of the policy trunk's stem summed "
                                          "from 3 channels (3), set from the initial weights.",
                                          cli=False, rule="positive")
    self_check: bool = setting(True, "On the first CUDA run with a device, driver, torch and "
                               "Triton, compare the fast paths with their references (a few "
                               "seconds, cached); a failing part falls back with one line.")
    synth_images: int = setting(2400, "Images of the embedded default data set.",
                                cli=False, rule="positive")
    synth_size: int = setting(96, "Image side of the embedded default data set.",
                              cli=False, rule="positive")

    @property
    def policy(self) -> bool:
        return self.stage == "heated"

    @property
    def lr_per_image(self) -> float:
        """The classifier's peak learning rate per image of the global batch (lr / global
        batch): equal in two runs, they take steps of the same size per image seen."""
        return self.lr / self.global_batch

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
        for f in dataclasses.fields(self):
            choices = meta(f.name)["choices"]
            if choices and choices is not MODELS and str(getattr(self, f.name)) not in choices:
                raise ConfigError(f"{flag_of(f.name)} must be one of {', '.join(choices)}, "
                                  f"not {getattr(self, f.name)!r}")
        self._check_numbers()
        if not 0 <= self.average_last <= self.epochs:
            raise ConfigError(f"--average-last must be between 0 and --epochs ({self.epochs}), "
                              f"not {self.average_last}")
        if self.average_last and self.policy:
            raise ConfigError("--average-last applies to the fine-tune and baseline stages: the "
                              "heated classifier goes with its policy")
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
        from .speed import check_flags  # imports torch: not at module level
        check_flags(self.compile, self.graphs)
        return self

    def _check_numbers(self) -> None:
        """Every numeric setting in its range (:data:`RULES`; one line naming the flag)."""
        for f in dataclasses.fields(self):
            if meta(f.name)["rule"]:
                check_value(flag_of(f.name), getattr(self, f.name), meta(f.name)["rule"])


# The authors' settings (docs/method.md §5): heated and baseline 90 epochs, fine-tune 10 with
# warm-up. Their global batch was 256 in every stage: 8 GPUs x 32 (heated, baseline; the reward
# group is the per-GPU batch) and 4 x 64 (fine-tune). Here the global batch is the unit: each
# process takes global / processes images, or accumulates gradients over smaller micro-batches.
AUTHORS = dict(global_batch=256, lr_base_size=256)
PAPER = {
    "heated": dict(AUTHORS, model="resnet50", epochs=90, lr_base=0.1, reward_group=32,
                   lr_scheduler="steplr", lr_step_size=30, lr_gamma=0.1),
    "baseline": dict(AUTHORS, model="resnet50", epochs=90, lr_base=0.1, lr_scheduler="steplr",
                     lr_step_size=30, lr_gamma=0.1),
    "finetune": dict(AUTHORS, model="resnet50", epochs=10, lr_base=0.001, lr_scheduler="steplr",
                     lr_step_size=30, lr_gamma=0.1, lr_warmup_epochs=7, lr_warmup_decay=0.01),
}

# Sized for a 2-core CPU in minutes: small crops and grid, the light classifier, global batch 32
# at the authors' lr per image (0.1 / 256 -> 0.0125; fine-tune 0.001 / 256 -> 1.25e-4).
TINY_COMMON = dict(model="resnet10t", global_batch=32, lr_base_size=256, grid=16,
                   train_crop_size=64, val_resize_size=73, val_crop_size=64, workers=2,
                   print_freq=10)
TINY = {
    "heated": dict(TINY_COMMON, epochs=6, lr_base=0.1, lr_scheduler="cosineannealinglr",
                   lr_warmup_epochs=1, lr_warmup_decay=0.1),
    "baseline": dict(TINY_COMMON, epochs=6, lr_base=0.1, lr_scheduler="cosineannealinglr",
                     lr_warmup_epochs=1, lr_warmup_decay=0.1),
    "finetune": dict(TINY_COMMON, epochs=2, lr_base=0.001, lr_scheduler="constant",
                     lr_warmup_epochs=1, lr_warmup_decay=0.01),
}

PRESETS = {"paper": PAPER, "tiny": TINY}


def make_config(stage: str, preset: str = "tiny", world_size: int = 1, log=None,
                **overrides) -> TrainConfig:
    """The preset's settings for a stage, then every override that is not None; the per-process
    batch, accumulation and lr resolved for ``world_size`` processes (:mod:`pgnm_fast.batching`),
    a warm-up as long as the run shortened (said through ``log``)."""
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
    return finish(values, world_size, log)


def finish(values: dict, world_size: int = 1, log=None) -> TrainConfig:
    """The checked config of ``values`` with what derives from them resolved."""
    values = dataclasses.asdict(TrainConfig(**values).check())  # in range before arithmetic
    values = shorten_warmup(resolve_batch(values, world_size), log)
    return TrainConfig(**values).check()


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a config stored in a checkpoint, ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in values.items() if k in known}
    if "global_batch" not in values and values.get("batch_size"):  # from before the global batch
        values.update(global_batch=values["batch_size"], accum_steps=1)
    return TrainConfig(**values)


def flag_of(name: str) -> str:
    """The CLI flag of a config field (``weight_decay`` -> ``--wd``, ``workers`` ->
    ``-j/--workers``); a key without a flag as itself."""
    field = meta(name)
    if not field["cli"]:
        return name
    flags = field["flags"] or ("--" + name.replace("_", "-"),)
    return f"{flags[0]}/{flags[1]}" if not flags[0].startswith("--") else flags[0]


def rule_of(name: str) -> str | None:
    """The range rule of a config field (:data:`RULES`), for options of other commands."""
    return meta(name)["rule"]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


__all__ = ["TrainConfig", "make_config", "config_from_dict", "PRESETS", "STAGES", "IMPLS",
           "OPTIMIZERS", "RULES", "check_value", "flag_of"]
