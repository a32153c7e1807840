"""`pgnm-fast compare`: does PGNM beat plain training on this data? One command, the paper's
protocol (docs/method.md §5 and §6): the heated stage, its fine-tune, and the baseline (the same
classifier trained the same way without masks), then both final models on the test split, paired,
over ``--seeds N`` seeds.

Seed ``s`` (``--seed`` + 0 .. N-1) sets the data order, the masks and the initialisation of all
three stages of that seed; its runs go to ``OUT/seed-<s>/{heated,finetune,baseline}``. The
fine-tune starts from the heated stage's last epoch, as the authors do (``--finetune-from last``),
or from its ``best.pt`` (``--finetune-from best``, picked on masked validation). Each arm's
epochs in all are stated: the PGNM arm trains heated + fine-tune epochs, the baseline its own;
``--match-budget`` gives the baseline as many epochs in all as the PGNM arm.

Running the same command again continues where it stopped: a finished stage (and a scored seed)
is reused, an interrupted stage resumed from its ``last.pt``; a larger ``--seeds`` adds seeds. A
folder made with other settings is refused, naming the setting that differs.

The report (printed, ``OUT/compare.json`` and the chart ``OUT/compare.png``; every key in
docs/outputs.md) gives for every metric of docs/method.md §6 (top-5 only with more than 5
classes) each arm's mean and standard deviation over seeds and the mean difference PGNM -
baseline with a 95% interval that accounts for the seeds and the test images
(:func:`pgnm_fast.metrics.seeds_and_images_interval`: a t-interval over seeds whose variance adds
the test-image bootstrap variance, Welch-Satterthwaite degrees of freedom, formed on Fisher's z
scale so it stays in [-1, 1]; for ROC-AUC and top-5, which a reweighting of images cannot give
cheaply, the t-interval over seeds alone), and the number of seeds in which PGNM is ahead. Below
3 seeds the table shows each seed's difference and the interval over test images instead
(:mod:`pgnm_fast.compare_report`). Each seed also keeps its one-seed paired bootstrap over the
test images, and each stage's wall time. The authors' RadImageNet numbers print beside the
user's as a reference when the data is RadImageNet (its CSV layout or its 165 classes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .compare_report import build_report, format_report, record_seed, write_compare_chart
from .compare_settings import stage_sets, start_overrides
from .config import make_config
from .distributed import shutdown, torchrun_env
from .errors import ConfigError, DataError
from .evaluate import predict_checkpoint
from .folders import check_output_dir
from .pipelines.sources import open_source
from .prepare import resolve_data
from .run_state import load_run_state
from .stages import run_stage

FINETUNE_FROM = ("last", "best")
POLICY_ONLY = ("policy_model", "policy_lr", "grid", "impl", "reward_group")
# settings not compared when a folder is reused: they do not change what a stage computes, or
# (threads) a stage records the count it chose and keeps it when resumed
NOT_COMPARED = ("workers", "print_freq", "threads", "initial_checkpoint")
# what a fine-tune takes from the heated checkpoint it starts from (pgnm_fast.prepare)
CARRIED = ("channels", "mean", "std", "stem_lr_scale", "policy_stem_lr_scale")
FLAGS = {"heated.epochs": "--epochs", "baseline.epochs": "--epochs / --match-budget",
         "finetune.epochs": "--finetune-epochs", "finetune_from": "--finetune-from",
         "data": "--data", "preset": "--preset", "match_budget": "--match-budget",
         "stage_settings": "--stage-set / --heated-lr / --finetune-lr / --baseline-lr",
         "initial_checkpoint_sha256": "--initial-checkpoint"}


def _flag(name: str) -> str:
    stage, _, key = name.rpartition(".")
    return FLAGS.get(name, f"--{key.replace('_', '-')}" + (f" ({stage} stage)" if stage else ""))


def _check_same(where, stored: dict, wanted: dict) -> None:
    """Refuse to reuse ``where`` when a setting differs, naming the first one."""
    for key, value in wanted.items():
        if key.rpartition(".")[2] in NOT_COMPARED or key not in stored:
            continue
        if stored[key] != value:
            raise ConfigError(f"{where} was made with {key} = {stored[key]!r}, not {value!r} "
                              f"({_flag(key)}): run with the same settings to continue it, or "
                              f"choose another --out")


def _flat(stage: str, cfg: dict) -> dict:
    return {f"{stage}.{k}": v for k, v in cfg.items() if k != "seed"}


def _stage(stage, folder: Path, expected: dict, log, **kwargs) -> tuple[Path, float]:
    """Train ``stage`` into ``folder``: fresh, resumed, or reused when already finished; a
    folder trained with other settings (``expected``, the stage's config) is refused."""
    last = folder / "last.pt"
    resume = None
    if last.exists():
        state = load_run_state(last)
        _check_same(folder, {**_flat(stage, state.config), "data": state.data},
                    {**_flat(stage, expected), "data": str(kwargs["data"])})
        if state.is_finished:
            log(f"compare: {stage} already finished its {state.train_config.epochs} epochs in "
                f"{folder}: reusing it (another --out trains afresh)")
            return folder, 0.0
        log(f"compare: {stage} stopped after epoch {state.epoch} in {folder}: resuming")
        resume = last
    t0 = time.perf_counter()
    run_stage(stage, out=folder, resume=resume, log=log, resume_hint_on_interrupt=False, **kwargs)
    return folder, time.perf_counter() - t0


def compare(data=None, out=None, preset="tiny", overrides=None, finetune_overrides=None,
            device=None, resamples: int = 1000, seed: int = 0, seeds: int = 1,
            finetune_from: str = "last", match_budget: bool = False, log=print,
            stage_settings=None, initial_checkpoint=None, allow_unequal_lr: bool = False) -> dict:
    """Run the three stages per seed and the paired test comparison (module docstring).
    ``stage_settings``: ``{stage: {setting: value}}`` for one stage alone
    (:func:`pgnm_fast.compare_settings.stage_sets`); ``initial_checkpoint``: weights (any form
    :func:`pgnm_fast.weights.read_weights` reads) both the heated stage and the baseline start
    from; the arms must train at the same lr per image unless ``allow_unequal_lr``."""
    if torchrun_env().rank != 0:  # torchrun: rank 0 speaks
        log = (lambda *_: None)
    if resamples < 1:
        raise ConfigError(f"--resamples must be positive, not {resamples}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be positive, not {seeds}")
    if finetune_from not in FINETUNE_FROM:
        raise ConfigError(f"--finetune-from must be one of {', '.join(FINETUNE_FROM)}, "
                          f"not {finetune_from!r}")
    sets = stage_settings or stage_sets()
    start = _start(initial_checkpoint)
    if start:  # both arms take the settings the weights bring, and the fine-tune after them
        overrides = start_overrides(start.pop("weights"), overrides or {})
        finetune_overrides = {**{k: v for k, v in overrides.items() if k in CARRIED},
                              **{k: v for k, v in (finetune_overrides or {}).items()
                                 if v is not None}}
    plan = stage_plan(preset, overrides, finetune_overrides, match_budget, sets)
    lrs = check_lr(plan, allow_unequal_lr)
    data = resolve_data(data, (), plan["heated"], log)  # before any training: the test split must exist
    if "test" not in open_source(data).splits:
        raise DataError(f"data at {data} has no test split: compare scores both models on it")
    if out is None and torchrun_env().world_size > 1:
        raise ConfigError("compare under torchrun needs --out (every process must name the same "
                          "folder)")
    out = Path(out) if out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(out, "--out")
    experiment = {"data": str(data), "preset": preset, "finetune_from": finetune_from,
                  "match_budget": match_budget, "stage_settings": sets,
                  "initial_checkpoint": start.get("path"),
                  "initial_checkpoint_sha256": start.get("sha256")}
    _check_experiment(out, experiment)
    common = dict(preset=preset, data=data, device=device, keep_process_group=True)
    setup = {"stage_settings": sets, "lr_per_image": lrs, "initial_checkpoint": start or None,
             "arms_differ_in_lr": not math.isclose(lrs["heated"], lrs["baseline"],
                                                   rel_tol=1e-9)}
    try:
        return _compare(out, plan, common, data, device, resamples, list(range(seed, seed + seeds)),
                        finetune_from, match_budget, log, setup)
    finally:
        shutdown()  # the process group the stages kept (torchrun)


def _start(initial_checkpoint) -> dict:
    """``{"path", "sha256", "weights"}`` of ``--initial-checkpoint`` (read and checked now), or
    {} without one."""
    if initial_checkpoint is None:
        return {}
    from .transfer import weights_sha256
    from .weights import read_weights
    path = Path(initial_checkpoint)
    weights = read_weights(path)
    return {"path": str(path.resolve()), "sha256": weights_sha256(path), "weights": weights}


def _check_experiment(out: Path, experiment: dict) -> None:
    """Refuse a folder made with other settings or from other starting weights; record them in
    a new one."""
    stored = out / "experiment.json"
    if not stored.exists():
        if torchrun_env().rank == 0:
            write_json_atomic(experiment, stored)
        return
    old = json.loads(stored.read_text())
    before = old.get("initial_checkpoint_sha256")
    if before != experiment["initial_checkpoint_sha256"] and (
            before or experiment["initial_checkpoint_sha256"]):
        made = (f"from the weights {old.get('initial_checkpoint')} (sha256 {before[:12]}...)"
                if before else "without --initial-checkpoint")
        now = (f"--initial-checkpoint {experiment['initial_checkpoint']} has other content"
               if experiment["initial_checkpoint"] else "this run gives no --initial-checkpoint")
        raise ConfigError(f"{out} was made {made}; {now}: start from the same weights to "
                          f"continue it, or choose another --out")
    _check_same(out, old, experiment)


def lr_per_image(cfg) -> float:
    """A stage's peak classifier lr per image of its global batch (``TrainConfig.lr_per_image``)."""
    return cfg.lr_per_image


def check_lr(plan: dict, allow_unequal: bool) -> dict:
    """Each stage's lr per image; the heated stage and the baseline must train at the same one
    (one line naming both, unless ``allow_unequal``)."""
    lrs = {stage: lr_per_image(plan[stage]) for stage in ("heated", "finetune", "baseline")}
    if not allow_unequal and not math.isclose(lrs["heated"], lrs["baseline"], rel_tol=1e-9):
        h, b = plan["heated"], plan["baseline"]
        raise ConfigError(
            f"the arms would train at different lr per image: heated {h.lr:g} / {h.global_batch} "
            f"images = {lrs['heated']:.4g}, baseline {b.lr:g} / {b.global_batch} = "
            f"{lrs['baseline']:.4g}; set both (--heated-lr, --baseline-lr or --stage-set "
            f"STAGE.lr=...), or pass --allow-unequal-lr")
    return lrs


def stage_plan(preset, overrides=None, finetune_overrides=None, match_budget=False,
               sets=None, world_size: int | None = None) -> dict:
    """:func:`make_plan` with the per-stage settings ``sets`` (``{stage: {key: value}}``), each
    for its stage alone."""
    sets = sets or {}
    heated_set, baseline_set = sets.get("heated", {}), sets.get("baseline", {})
    shared = {k: v for k, v in (overrides or {}).items() if v is not None and k != "seed"}
    if match_budget and "epochs" in baseline_set:
        raise ConfigError("--match-budget sets the baseline's epochs: drop --stage-set "
                          "baseline.epochs, or --match-budget")
    plan = make_plan(preset, {**shared, **heated_set},
                     {**(finetune_overrides or {}), **sets.get("finetune", {})}, match_budget,
                     world_size)
    if heated_set or baseline_set:  # the baseline takes the shared settings, not the heated ones
        plain = {**{k: v for k, v in shared.items() if k not in POLICY_ONLY}, **baseline_set}
        if match_budget:
            plain["epochs"] = plan["heated"].epochs + plan["finetune"].epochs
        world = torchrun_env().world_size if world_size is None else world_size
        plan["baseline"] = make_config("baseline", preset, world, **plain)
        plan["overrides"]["baseline"] = plain
    return plan


def make_plan(preset, overrides=None, finetune_overrides=None, match_budget=False,
              world_size: int | None = None) -> dict:
    """The three stages' configs (seed aside) and overrides: the fine-tune keeps the heated
    classifier; the baseline drops the policy settings and, with ``match_budget``, trains as many
    epochs as heated + fine-tune. Each stage has its preset's global batch and lr for it, on
    ``world_size`` processes (default: torchrun's, else 1): the per-process batch and the
    gradient accumulation are resolved per stage (:mod:`pgnm_fast.batching`), so both arms train
    at the preset's lr per image (``TrainConfig.lr_per_image``)."""
    world = torchrun_env().world_size if world_size is None else world_size
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and k != "seed"}
    finetune_overrides = {k: v for k, v in (finetune_overrides or {}).items()
                          if v is not None and k != "seed"}
    heated = make_config("heated", preset, world, **overrides)
    finetune_overrides["model"] = heated.model
    finetune = make_config("finetune", preset, world, **finetune_overrides)
    plain = {k: v for k, v in overrides.items() if k not in POLICY_ONLY}
    if match_budget:
        plain["epochs"] = heated.epochs + finetune.epochs
    baseline = make_config("baseline", preset, world, **plain)
    return dict(heated=heated, finetune=finetune, baseline=baseline,
                overrides=dict(heated=overrides, finetune=finetune_overrides, baseline=plain))


def _run_seed(folder: Path, s: int, plan: dict, common: dict, finetune_from: str, log,
              start=None):
    """The three stages of seed ``s`` (the heated one and the baseline from the weights
    ``start`` when given); returns ({stage: folder}, {stage: seconds})."""
    runs, seconds = {}, {}
    for stage in ("heated", "finetune", "baseline"):
        cfg = plan[stage].replace(seed=s)
        extra = {}
        if stage == "finetune":
            extra["init_from"] = runs["heated"] / f"{finetune_from}.pt"
        elif start is not None:
            extra["init_from"] = start
        runs[stage], seconds[stage] = _stage(
            stage, folder / stage, dataclasses.asdict(cfg), log,
            overrides=dict(plan["overrides"][stage], seed=s), **extra, **common)
    return runs, seconds


def _score_seed(folder: Path, runs: dict, fresh: bool, data, device, log):
    """Logits of both final models (``best.pt``) on the test split, cached in ``scores.npz``."""
    cache = folder / "scores.npz"
    if cache.exists() and not fresh:
        with np.load(cache) as z:
            return z["baseline"], z["pgnm"], z["labels"]
    scored = {name: predict_checkpoint(runs[stage] / "best.pt", data, "test", device=device,
                                       log=log, show_progress=False)
              for name, stage in (("baseline", "baseline"), ("pgnm", "finetune"))}
    (logits_a, labels, _), (logits_b, labels_b, _) = scored["baseline"], scored["pgnm"]
    if not np.array_equal(labels, labels_b):
        raise DataError(f"the baseline in {runs['baseline']} and the fine-tuned model in "
                        f"{runs['finetune']} were not scored on the same test images (trained on "
                        f"different data?)")
    from .atomic import atomic_open
    with atomic_open(cache, "wb") as f:
        np.savez(f, baseline=logits_a, pgnm=logits_b, labels=labels)
    return logits_a, logits_b, labels


def _compare(out, plan, common, data, device, resamples, seed_list, finetune_from,
             match_budget, log, setup):
    main = torchrun_env().rank == 0
    per_seed, logits, seconds = {}, {"baseline": [], "pgnm": []}, {}
    labels = None
    for s in seed_list:
        folder = out / f"seed-{s}"
        if len(seed_list) > 1:
            log(f"compare: seed {s} ({seed_list.index(s) + 1} of {len(seed_list)}) -> {folder}")
        start = (setup["initial_checkpoint"] or {}).get("path")
        runs, seconds[str(s)] = _run_seed(folder, s, plan, common, finetune_from, log, start)
        if not main:  # torchrun: rank 0 scores and reports
            continue
        a, b, lab = _score_seed(folder, runs, any(seconds[str(s)].values()), data, device, log)
        if labels is not None and not np.array_equal(labels, lab):
            raise DataError(f"seed {s} was scored on other test images than seed {seed_list[0]}")
        labels = lab
        record_seed(per_seed, logits, s, a, b, lab, resamples, {k: str(v) for k, v in runs.items()})
    if not main:
        return {}
    report = build_report(per_seed, logits, labels, resamples, seed_list, plan, finetune_from,
                          match_budget, seconds, layout=open_source(data).layout, setup=setup)
    return _write_report(report, out, log)


def _write_report(report: dict, out: Path, log) -> dict:
    write_json_atomic(report, out / "compare.json")
    for line in format_report(report):
        log(line)
    chart = write_compare_chart(report, out / "compare.png")
    log(f"compare: report written to {out / 'compare.json'}"
        + (f", chart to {chart}" if chart else ""))
    return report


def score(runs, data=None, out=None, device=None, resamples: int = 1000, log=print) -> dict:
    """`compare --score`: the report over hand-run stages (:mod:`pgnm_fast.compare_score`)."""
    from .compare_score import default_out, parse_pairs, score_pairs
    if resamples < 1:
        raise ConfigError(f"--resamples must be positive, not {resamples}")
    pairs = parse_pairs(runs)
    out = Path(out) if out else default_out()
    check_output_dir(out, "--out")
    per_seed, logits, labels, seed_list, described, data = score_pairs(
        pairs, data, device, resamples, log)
    report = build_report(per_seed, logits, labels, resamples, seed_list, None, None, None,
                          {}, layout=open_source(data).layout, setup={"scored": described})
    out.mkdir(parents=True, exist_ok=True)
    return _write_report(report, out, log)
