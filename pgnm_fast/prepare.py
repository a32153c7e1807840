"""A stage's input, checked before anything is written: the config (a resumed run's own, or the
preset's with the flags), the data and its splits, the checkpoint the run resumes or starts
from, and the run folder. :func:`prepare_run` assembles them into a :class:`Run`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .batching import rebase
from .config import TrainConfig, finish, make_config
from .distributed import DistInfo, init_distributed, torchrun_env
from .errors import ConfigError, DataError
from .folders import check_output_dir
from .optim import stem_lr_scales
from .pipelines.badfiles import report_bad
from .pipelines.sources import open_source
from .run_folder import check_fresh
from .run_state import RunState, load_run_state
from .state_checks import check_fits, check_weights_fit
from .weights import Weights, read_weights, resolve_model


@dataclasses.dataclass
class Run:
    """What one stage needs, assembled and checked before anything is written."""
    cfg: TrainConfig
    info: DistInfo
    data_root: Path
    classes: list
    train_split: object
    val_split: object
    out: Path
    resume_state: RunState | None = None
    init: Weights | None = None  # --initial-checkpoint / --from
    init_from: str | None = None  # the path of --initial-checkpoint / --from
    recheck: bool = False  # check the image files afresh (not the cached verdict)
    notes: list = dataclasses.field(default_factory=list)  # said when the run starts


def resolve_data(data: str | os.PathLike | None, states: Iterable[RunState | None],
                 cfg: TrainConfig, log: Callable[[str], None]) -> Path:
    """``--data``, else the data of a checkpoint the run starts from, else the embedded set."""
    if data is not None:
        return Path(os.path.abspath(Path(data).expanduser()))  # any folder can resume
    for state in states:
        if state is not None and state.data:
            return Path(state.data)
    from .synth import ensure_default_data
    return ensure_default_data(log=log, images=cfg.synth_images, size=cfg.synth_size)


def _config(stage: str, preset: str, overrides: dict, resume_state: RunState | None, resume,
            init: Weights | None, log=None) -> TrainConfig:
    """The stage's config: a resumed run's own, else the preset's; both with the overrides,
    resolved for this many processes (:mod:`pgnm_fast.batching`). A run from a pgnm-fast
    checkpoint keeps its input form (channels, normalisation)."""
    world_size = torchrun_env().world_size
    if resume_state is not None:
        if resume_state.stage != stage:
            raise ConfigError(f"--resume {resume} is a {resume_state.stage} checkpoint, not {stage}")
        stored = dataclasses.asdict(resume_state.train_config)
        cfg = finish(rebase(stored, overrides, world_size), world_size, log)
        check_fits(resume_state, cfg, resume, "--resume")
        return cfg
    if init is not None:
        overrides["model"] = resolve_model(init, overrides.get("model"))
        if init.state is not None:  # a pgnm-fast run's input form carries over
            saved = init.state.train_config
            overrides.setdefault("channels", init.state.in_chans)
            for key in ("mean", "std"):
                if getattr(saved, key) is not None:
                    overrides.setdefault(key, getattr(saved, key))
        for key, scale in stem_lr_scales(init, overrides.get("channels", 1)).items():
            overrides.setdefault(key, scale)
    return make_config(stage, preset, world_size, log, **overrides)


def prepare_run(stage: str, preset: str = "tiny", overrides: dict | None = None,
                data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
                device: str | None = None, log: Callable[[str], None] = print) -> Run:
    """Check everything about a stage's input and assemble its :class:`Run` (nothing written)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    resume_state = load_run_state(resume) if resume else None
    init = read_weights(init_from) if init_from else None  # any form (pgnm_fast.weights)
    notes = []  # said when the run starts: a refused input is its one error line alone
    cfg = _config(stage, preset, overrides, resume_state, resume, init, notes.append)
    info = init_distributed(device)
    if data is None and init is not None and init.state is not None:
        data = init.state.data or None  # the data the checkpoint was trained on
    data_root = resolve_data(data, (resume_state,), cfg, log)
    source = open_source(data_root, skip_bad=cfg.on_bad_image == "skip")
    train_split = source.split("train")
    if "val" not in source.splits:
        raise DataError(f"data at {data_root} has no val split (the run selects best.pt on it)")
    val_split = source.split("val")
    report_bad(source.problems, cfg.on_bad_image, None, log, what="entry")
    classes = list(source.classes)
    if resume_state is not None and list(resume_state.classes) != classes:
        raise DataError(f"the classes of {data_root} differ from those of --resume {resume}")
    if resume_state is not None:
        check_weights_fit(resume_state, cfg, classes, resume, "--resume")
    run_dir = Path(out) if out else (Path(os.path.realpath(resume)).parent if resume else
                                     Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_fresh(run_dir, resume)
    check_output_dir(run_dir, "--out")
    if len(train_split) < cfg.global_batch:
        raise DataError(f"the train split of {data_root} has {len(train_split)} images, fewer than "
                        f"one global batch of {cfg.global_batch}: lower --global-batch")
    return Run(cfg, info, data_root, classes, train_split, val_split, run_dir, resume_state, init,
               str(init_from) if init_from else None, notes=notes)
