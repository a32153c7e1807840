"""The fast paths prove themselves where they run: a check of a few seconds, once per device.

On the first CUDA run on a device (keyed by the GPU's name, the driver, torch and its CUDA, and
Triton), each fast path the run uses is compared, on fixed inputs, with its reference:

- ``sample_score``: the fused sample + score. Its draws are random, so the law is tested with the
  Kolmogorov-Smirnov tests of :func:`pgnm_fast.kernels.checks.check_sampling` (fixed seed, quick
  sweep) and log p, S and the gradients on the very samples it drew against float64
  (:func:`~pgnm_fast.kernels.checks.check_scores`);
- ``apply``: the fused apply against float64 and the reference upsample + blur
  (:func:`~pgnm_fast.kernels.checks.check_apply`);
- ``resized_crop``: the device loader's resize (the Triton kernel on CUDA) against its integer
  torch version, bit for bit (on the CPU: torch's antialiased resize, within one grey level);
- ``graphed_step``: a heated step replayed as a CUDA graph (:class:`~pgnm_fast.graphs.GraphedStep`)
  against the eager step from the same start weights and batches: the updated weights, the
  metrics and the mask stream (on the CPU the "capture" replays the step eagerly, so the
  wrapper's copies and metric hand-over are what is checked).

The result is cached as a small JSON file under the cache folder ($PGNM_FAST_CACHE, else
$XDG_CACHE_HOME/pgnm-fast or ~/.cache/pgnm-fast), named by the key, written atomically; a new
driver, torch or Triton checks again. :func:`apply_fallbacks` turns a failed part into the
setting that avoids it, with one line naming the part, its error and the full check
(``pgnm-fast validate --device cuda``). The checks draw from their own seeded generators and
leave torch's random state as they found it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PARTS = ("sample_score", "apply", "resized_crop", "graphed_step")
CHECK_VERSION = 1  # of the checks themselves: a changed check runs again
SEED = 20240601
FULL_CHECK = "pgnm-fast validate --device cuda"
# part -> (config field, the value that uses the part, the value that avoids it, in words)
CHECKED_DEVICES = ("cuda",)  # where a training run checks its fast paths first
FALLBACKS = {
    "sample_score": ("impl", "fast", "reference", "--impl reference"),
    "apply": ("impl", "fast", "reference", "--impl reference"),
    "graphed_step": ("graphs", True, False, "no --graphs (eager steps)"),
    "resized_crop": ("loader", "device", "auto", "--loader auto (DALI, else the plain loader)"),
}


@dataclass
class PartResult:
    ok: bool
    error: str = ""       # one line, empty when ok
    seconds: float = 0.0


@dataclass
class SelfCheckResult:
    key: dict
    parts: dict = field(default_factory=dict)  # part name -> PartResult
    cached: bool = False   # every part came from the cache
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.parts.values())

    def failed(self) -> dict:
        """part -> error of every failed part."""
        return {p: r.error for p, r in self.parts.items() if not r.ok}


# ------------------------------------------------------------------------------ key and cache
def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(\S+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        import ctypes
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"cuda-driver-api-{version.value}"
    except (OSError, AttributeError):
        return None


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def device_key(device) -> dict:
    """What the check's verdict depends on: the device, the driver, torch, CUDA and Triton."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return {"check": CHECK_VERSION, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "driver": _driver_version() if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _triton_version()}


def cache_path(key: dict) -> Path:
    from .user_cache import cache_dir
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "self-check" / f"{digest}.json"


def _read_cache(path: Path, key: dict) -> dict:
    """part -> PartResult from the cache file, if it holds this very key."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return {}
        return {p: PartResult(**r) for p, r in data["parts"].items() if p in PARTS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or damaged: check again


def _write_cache(path: Path, key: dict, parts: dict) -> None:
    from .atomic import atomic_open
    from .errors import PgnmError
    text = json.dumps({"key": key, "parts": {p: asdict(r) for p, r in parts.items()}}, indent=1)
    with contextlib.suppress(PgnmError, OSError):  # a read-only cache folder: check every run
        with atomic_open(path, "w") as fh:
            fh.write(text + "\n")


# ---------------------------------------------------------------------------------- the checks
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _check_sample_score(device) -> str | None:
    from .kernels.checks import check_sampling, check_scores
    torch.manual_seed(SEED)  # the reference sampler draws from torch's generator
    sampling = check_sampling(device, "auto", SEED, quick=True)
    for r in sampling["pairs"]:
        if not r["passed"]:
            return (f"sampling at alpha {r['alpha']:g}, beta {r['beta']:g}: KS p = "
                    f"{min(r['ks1_p'], r['ks2_p']):.1e}, below {sampling['level_per_test']:.1e}")
    for r in sampling["power"]:
        if not r["passed"]:
            return f"the KS tests did not reject a wrong sampler ({r['wrong']}) at ({r['alpha']:g}, {r['beta']:g})"
    scores = check_scores(device, "auto", torch.Generator().manual_seed(SEED), quick=True)
    for r in scores["cases"]:
        if not r["same_draw"]:
            return (f"scores B={r['rows']} G={r['grid']} {r['dtype']}: the autograd call's m or S "
                    f"differs from the kernel's")
        for k in ("logp", "S", "grad_a", "grad_b"):
            if not r[k]["norm"] <= 1.0:
                return (f"scores B={r['rows']} G={r['grid']} {r['dtype']}: {k} error "
                        f"{r[k]['max_abs']:.1e}, {r[k]['norm']:.2g} x its bound")
    return None


def _check_apply(device) -> str | None:
    from .kernels.checks import check_apply
    result = check_apply(device, "auto", torch.Generator().manual_seed(SEED), quick=True)
    for r in result["cases"]:
        if not r["passed"]:
            where = (f"G={r['grid']} crop {r['crop'][0]}x{r['crop'][1]} C={r['channels']} {r['dtype']} "
                     f"{'NHWC' if r['channels_last'] else 'NCHW'}")
            if not r["layout_kept"]:
                return f"apply {where}: the output's dtype, shape or memory format differs from the input's"
            worst = max(r["vs_exact"]["norm"], r["vs_reference"]["norm"])
            return f"apply {where}: error {r['vs_exact']['max_abs']:.1e}, {worst:.2g} x its bound"
    return None


def _crop_inputs(n: int = 6, size: int = 40):
    """Fixed grey images of random sizes in one flat uint8 tensor, with random crops and flips."""
    import numpy as np
    rng = np.random.default_rng(SEED)
    hs, ws = rng.integers(8, 90, n), rng.integers(8, 90, n)
    imgs = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in zip(hs, ws)]
    base = np.concatenate([[0], np.cumsum(hs * ws)[:-1]])
    boxes = []
    for h, w in zip(hs, ws):
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        boxes.append([int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw])
    data = torch.from_numpy(np.concatenate([a.ravel() for a in imgs]))
    return (data, torch.from_numpy(base.astype(np.int64)), torch.from_numpy(ws.astype(np.int64)),
            torch.tensor(boxes), torch.full((n, 2), size), torch.zeros(n, 2, dtype=torch.int64),
            torch.from_numpy(rng.random(n) < 0.5))


def _check_resized_crop(device) -> str | None:
    from .pipelines.augment import resized_crop, taps, value_table
    dev = torch.device(device)
    n, size = 6, 40
    args = _crop_inputs(n, size)
    k = taps(90, size)  # the images are at most 89 pixels
    want = torch.empty(n, 1, size, size)
    resized_crop(want, *args, value_table(), k, impl="torch")
    level = float(value_table()[1] - value_table()[0])  # one grey level, normalised
    layouts = [(1, torch.float32, torch.contiguous_format)]
    if dev.type == "cuda":  # the loader's form under --amp --channels-last too
        layouts.append((3, torch.bfloat16, torch.channels_last))
    for channels, dtype, fmt in layouts:
        out = torch.full((n, channels, size, size), float("nan"), dtype=dtype, device=dev)
        out = out.contiguous(memory_format=fmt)
        resized_crop(out, *(a.to(dev) for a in args), value_table(dtype=dtype, device=dev), k)
        got = out.float().cpu()
        ref = want.expand(n, channels, size, size).to(dtype).float()
        name = f"{channels} channel(s) {str(dtype).replace('torch.', '')}"
        if not torch.isfinite(got).all():
            return f"resized crop {name}: pixels left unwritten"
        diff = (got - ref).abs()
        if dev.type == "cuda" and diff.max() > 0:
            return f"resized crop {name}: {int((diff > 0).sum())} pixels differ from the integer reference"
        if dev.type != "cuda" and (diff.max() > 1.001 * level or (diff > 0).float().mean() > 0.2):
            return f"resized crop {name}: {diff.max() / level:.1f} grey levels from the integer reference"
    return None


def _heated_step(dev, graphed: bool):
    """(modules, step runner, masker) of a small heated step, the same start weights each call."""
    from .engine import HeatedStep
    from .graphs import GraphedStep
    from .kernels import FastMasker
    from .models import PolicyNet, create_model
    torch.manual_seed(SEED)
    model = create_model("resnet10t", 5, in_chans=1).to(dev)
    policy = PolicyNet(grid=8, in_chans=1).to(dev)
    masker = FastMasker(8, 64, seed=7).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    popt = torch.optim.SGD(policy.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    step = HeatedStep(model, policy, masker, opt, popt, False, dev)
    if graphed:
        emulate = {} if dev.type == "cuda" else {"capture": lambda fn: fn, "warm": lambda fn: fn()}
        step = GraphedStep(step, [opt, popt], warmup=1, log=lambda line: None, **emulate)
    return torch.nn.ModuleList([model, policy]), step, masker


def _check_graphed_step(device) -> str | None:
    from .engine import N_STATS
    dev = torch.device(device)
    g = torch.Generator().manual_seed(SEED)
    batches = [(torch.randn(4, 1, 64, 64, generator=g).to(dev), torch.randint(0, 5, (4,), generator=g).to(dev))
               for _ in range(2)]  # the warm-up step, then the captured one
    runs = []
    for graphed in (False, True):
        modules, step, masker = _heated_step(dev, graphed)
        stats = torch.zeros(N_STATS, device=dev)
        for images, target in batches:
            step(images, target, stats)
        if graphed and step.eager_reason is not None:
            return f"capture failed: {step.eager_reason[:200]}"
        runs.append(({k: v.detach().float().cpu() for k, v in modules.state_dict().items()},
                     stats.cpu(), masker.rng_state.cpu()))
    (eager, eager_stats, eager_rng), (replayed, stats, rng) = runs
    if not torch.equal(rng, eager_rng):
        return f"the mask stream moved to {rng.tolist()}, the eager step's to {eager_rng.tolist()}"
    for name in eager:
        if not torch.allclose(replayed[name], eager[name], rtol=1e-4, atol=1e-5):
            err = float((replayed[name] - eager[name]).abs().max())
            return f"after one captured step {name} is {err:.1e} from the eager step's"
    if not torch.allclose(stats, eager_stats, rtol=1e-4, atol=1e-5):
        return "the step's metrics differ from the eager step's"
    return None


CHECKS = {"sample_score": _check_sample_score, "apply": _check_apply,
          "resized_crop": _check_resized_crop, "graphed_step": _check_graphed_step}


@contextlib.contextmanager
def _isolated(device):
    """torch's random state and cuDNN's settings as they were after the checks."""
    dev = torch.device(device)
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _run_part(part: str, device) -> PartResult:
    t0 = time.perf_counter()
    try:
        with torch.no_grad() if part == "resized_crop" else contextlib.nullcontext():
            error = CHECKS[part](device)
    except Exception as e:  # noqa: BLE001 - a fast path that raises fails its check
        error = _first_line(e)
    return PartResult(ok=error is None, error=error or "", seconds=round(time.perf_counter() - t0, 3))


def run_self_check(device, log=print, parts=PARTS, cache: bool = True) -> SelfCheckResult:
    """Check ``parts`` of the fast path on ``device`` against their references (module
    docstring); with ``cache``, parts already checked with this key are read, not run."""
    unknown = [p for p in parts if p not in CHECKS]
    if unknown:
        raise ValueError(f"unknown self-check part(s) {unknown}: the parts are {', '.join(PARTS)}")
    key = device_key(device)
    path = cache_path(key)
    stored = _read_cache(path, key) if cache else {}
    todo = [p for p in parts if p not in stored]
    fresh = {}
    if todo:
        t0 = time.perf_counter()
        with _isolated(device):
            fresh = {p: _run_part(p, device) for p in todo}
        if cache:
            _write_cache(path, key, {**stored, **fresh})
        verdicts = ", ".join(f"{p} {'ok' if r.ok else 'FAILED'}" for p, r in fresh.items())
        log(f"self-check of the fast paths on {key['device']} (torch {key['torch']}, Triton "
            f"{key['triton']}): {verdicts} ({time.perf_counter() - t0:.1f} s"
            + (f"; kept in {path})" if cache else ")"))
    merged = {**stored, **fresh}
    return SelfCheckResult(key=key, parts={p: merged[p] for p in parts}, cached=not todo,
                           path=path if cache else None)


# ---------------------------------------------------------------------------------- fallbacks
def parts_for(cfg) -> tuple:
    """The parts a training configuration uses (its fast paths)."""
    return tuple(p for p in PARTS if getattr(cfg, FALLBACKS[p][0], None) == FALLBACKS[p][1])


def apply_fallbacks(result: SelfCheckResult, cfg) -> tuple[dict, list[str]]:
    """(config changes, lines): for each failed part that ``cfg`` uses, the setting that avoids
    it and one line naming the part, its error and the full check."""
    changes, lines = {}, []
    for part, error in result.failed().items():
        name, uses, avoid, words = FALLBACKS[part]
        if getattr(cfg, name, None) != uses:
            continue
        changes[name] = avoid
        lines.append(f"self-check: {part} failed on {result.key['device']} ({error}); "
                     f"running with {words}. The full check: {FULL_CHECK}")
    return changes, lines


def check_and_fall_back(cfg, device, log=print) -> dict:
    """The training run's call: on a CUDA device and unless ``cfg.self_check`` is off, check the
    parts ``cfg`` uses, log a line per fallback, and return the config changes to apply
    (``dataclasses.replace(cfg, **changes)``)."""
    if torch.device(device).type not in CHECKED_DEVICES or not getattr(cfg, "self_check", True):
        return {}
    parts = parts_for(cfg)
    if not parts:
        return {}
    changes, lines = apply_fallbacks(run_self_check(device, log=log, parts=parts), cfg)
    for line in lines:
        log(line)
    return changes


__all__ = ["PARTS", "PartResult", "SelfCheckResult", "run_self_check", "apply_fallbacks", "parts_for",
           "check_and_fall_back", "device_key", "cache_path"]
