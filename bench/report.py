"""The benchmark records and the performance table of docs/performance.md, generated, never typed.

    python bench/report.py record --raw bench/results/raw --tag DEVICE --out bench/results/DEVICE.json
    python bench/report.py table [--check]        # (also accepted as: readme)

``record`` (called by bench/run_gpu.sh) gathers one run's raw outputs: the kernel and step
benchmark JSONs, the validate JSON, the tests' JUnit XML, the end-to-end training's metrics.jsonl
and each step's exit status, and writes one record: device, driver (from nvidia-smi, if present),
torch and its CUDA, triton, every figure, every target (bench/targets.py) met or not. The step
benchmark's figures come from its JSON, or where a time-box stopped it before the JSON was
written, from the rows it wrote as each case ended (``<tag>-step-rows.jsonl``). A record already
at ``--out`` for the same tag keeps the parts this run has no outputs for (a later run of some
steps only, ``run_gpu.sh loader``, adds its figures to the record).
``table`` rewrites the part of docs/performance.md between the performance markers: the targets,
then every bench/results/*.json's figures, naming each figure's device (the file is made, with a
title and the markers, where it does not exist); ``--check`` exits 1 if the page is not what the
records give.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from targets import TARGETS  # noqa: E402  (bench/ is not a package)
from targets import table as targets_table  # noqa: E402

PAGE = ROOT / "docs" / "performance.md"
START, END = "<!-- performance table: start (python bench/report.py readme) -->", \
    "<!-- performance table: end -->"
HEADLINE = {"model": "resnet50", "crop": 224, "batch": 256, "setting": "bf16_cl_graphs"}
STEP_TARGETS = ("heated_img_s", "heated_over_plain", "fused_vs_authors", "graphs_vs_eager_b32")


def _load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import platform
    out = {"python": platform.python_version(), "torch": None, "cuda": None, "triton": None,
           "device_name": None}
    try:
        import torch
        out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
        out["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def step_figures(bench: dict | None) -> dict:
    """Rows and ratios of bench_step.py's JSON; each ratio with its spread over the rounds."""
    if not bench:
        return {}
    rows = []
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("op") != "train_step":
            continue
        s = b["stats"]
        per = s["median"] / info["seconds_per_step"]  # steps per timed round
        rows.append(dict({k: v for k, v in info.items() if k != "ratios"},
                         q1_s=s["q1"] / per, q3_s=s["q3"] / per, rounds=s["rounds"]))
    from bench_step import ratios  # noqa: E402  (bench/ is not a package)
    by_key = {(r["model"], r["crop"], r["batch"], r["arm"], r["setting"]): r for r in rows}
    found = ratios([(r, r["seconds_per_step"]) for r in rows])
    for f in found:  # spread: the other arm's quartiles against this arm's
        this = by_key[(f["model"], f["crop"], f["batch"], f["arm"], f["setting"])]
        other = _other(f, by_key)
        if other is None:
            continue
        if f["ratio"] == "heated_over_plain":
            f["low"], f["high"] = this["q1_s"] / other["q3_s"], this["q3_s"] / other["q1_s"]
        else:
            f["low"], f["high"] = other["q1_s"] / this["q3_s"], other["q3_s"] / this["q1_s"]
    return {"rows": rows, "ratios": found}


def _other(f, by_key):
    m, c, b, arm, setting = f["model"], f["crop"], f["batch"], f["arm"], f["setting"]
    other = {"vs_authors": ("authors", "fp32"), "vs_reference": ("reference", setting),
             "heated_over_plain": ("plain", setting),
             "graphs_vs_eager": (arm, setting.removesuffix("_graphs")),
             "compile_vs_eager": (arm, setting.removesuffix("_compile")),
             "channels_last_vs_nchw": (arm, "fp32")}[f["ratio"]]
    return by_key.get((m, c, b, *other))


def train_figures(metrics_path) -> dict:
    """The end-to-end run: img/s over each epoch and the steady rate of the last epoch's steps."""
    if not metrics_path or not os.path.exists(metrics_path):
        return {}
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [r for r in records if r.get("kind") == "step"]
    out = {"epochs": len(epochs), "steps": steps[-1]["step"] if steps else 0}
    if epochs:
        out["epoch_img_s"] = [r["train_images"] / r["seconds"] for r in epochs]
    last = [r["img_s"] for r in steps if epochs and r["epoch"] == epochs[-1]["epoch"]]
    if last:
        out["last_epoch_step_img_s"] = sorted(last)[len(last) // 2]
    return out


def _rows(path) -> dict | None:
    """bench_step.py's rows file (one JSON line per case, as each ended) as its JSON's
    ``benchmarks``; None where there is none. A line cut short by a kill is left out."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return {"benchmarks": rows} if rows else None


def loader_figures(bench: dict | None) -> dict:
    """bench_device_loader.py's figures: each benchmark's ``extra_info`` by its name."""
    if not bench:
        return {}
    return {b["name"]: b.get("extra_info", {}) for b in bench.get("benchmarks", [])}


PARTS = ("kernels", "validate", "tests", "step", "train", "loader")  # a record's per-step figures


def merge(old: dict | None, new: dict) -> dict:
    """``new``, with the parts it lacks taken from ``old`` (the same tag's earlier record) and
    the targets recomputed from the merged step figures."""
    if not old or old.get("tag") != new.get("tag"):
        return new
    out = dict(new)
    for part in PARTS:
        if not out.get(part) and old.get(part):
            out[part] = old[part]
    out["exit_status"] = {**old.get("exit_status", {}), **new.get("exit_status", {})}
    out["targets"] = targets(out.get("step") or {}, out["on_gpu"])
    return out


def targets(step: dict, on_gpu: bool) -> dict:
    """Every target, met or not (None: not measured in this run; on the CPU: not a target)."""
    rows = {(r["model"], r["crop"], r["batch"], r["arm"], r["setting"]): r for r in step.get("rows", [])}
    rat = {(r["ratio"], r["model"], r["crop"], r["batch"], r["arm"], r["setting"]): r["value"]
           for r in step.get("ratios", [])}
    h = HEADLINE
    head = (h["model"], h["crop"], h["batch"], "fast", h["setting"])
    value = {
        "heated_img_s": rows[head]["img_s"] if head in rows else None,
        "heated_over_plain": rat.get(("heated_over_plain", *head)),
        "fused_vs_authors": rat.get(("vs_authors", *head)),
        "graphs_vs_eager_b32": rat.get(("graphs_vs_eager", h["model"], h["crop"], 32, "fast", h["setting"])),
    }
    out = {}
    for name in STEP_TARGETS:
        v = value[name]
        met = TARGETS[name].met(v) if on_gpu else None
        out[name] = {"value": v, "needed": TARGETS[name].needed_text, "met": met,
                     "where": f"heated fused step, {h['model']} {h['crop']}px, "
                              f"B={32 if name.endswith('b32') else h['batch']}, {h['setting']}"}
    return out


def record(raw: str, tag: str) -> dict:
    raw = Path(raw)
    from bench_kernels import summarize  # noqa: E402
    kernels = raw / f"{tag}-bench.json"
    rec = _versions()
    machine = next((d["machine_info"] for d in (_load(raw / f"{tag}-step.json"), _load(kernels))
                    if d and "machine_info" in d), {})
    rec.update(tag=tag, driver=driver(), device_name=machine.get("device_name", rec["device_name"]),
               on_gpu=machine.get("device", "cpu" if rec["device_name"] in (None, "cpu") else "cuda") == "cuda",
               datetime=next((d["datetime"] for d in (_load(raw / f"{tag}-step.json"), _load(kernels))
                              if d and "datetime" in d), None))
    if kernels.exists():
        rec["kernels"] = summarize(str(kernels), str(raw / f"{tag}-validate.json"), str(raw / f"{tag}-tests.xml"))
    else:
        rec["kernels"] = None
        if (raw / f"{tag}-validate.json").exists():
            rec["validate"] = _load(raw / f"{tag}-validate.json")
    if (raw / f"{tag}-tests.xml").exists():
        suite = ET.parse(raw / f"{tag}-tests.xml").getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        rec["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    eager = _load(raw / f"{tag}-step.json") or _rows(raw / f"{tag}-step-rows.jsonl")
    step = step_figures(eager)
    compiled = step_figures(_load(raw / f"{tag}-step-compile.json"))
    if compiled:  # the compile cases ran apart: their ratios need the eager rows too
        step = step_figures({"benchmarks": (eager or {"benchmarks": []})["benchmarks"]
                             + _load(raw / f"{tag}-step-compile.json")["benchmarks"]})
    rec["step"] = step
    rec["train"] = train_figures(raw / f"{tag}-train-metrics.jsonl")
    rec["loader"] = loader_figures(_load(raw / f"{tag}-loader.json"))
    rec["exit_status"] = {p.name[len(tag) + 1:-3]: int(p.read_text().strip() or -1)
                          for p in sorted(raw.glob(f"{tag}-*.rc"))}
    rec["targets"] = targets(step, rec["on_gpu"])
    return rec


# ------------------------------------------------------------------------- docs/performance.md
def _fmt(v, digits=2):
    return "n/a" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}f}")


def table(records: list[tuple[str, dict]]) -> str:
    lines = ["| device (record) | figure | value | target |", "|---|---|---|---|"]
    for name, rec in records:
        dev = f"{rec.get('device_name') or rec.get('machine_info', {}).get('device_name', '?')} (`{name}`)"
        k = rec.get("kernels") or (rec if "speedups" in rec else None)
        if k:
            steps = [s["speedup"] for s in k.get("speedups", []) if s["op"] == "step"]
            if steps:
                lines.append(f"| {dev} | mask step, fused over reference (G 64, 224 px, B 32-256) | "
                             f"{min(steps):.1f}x to {max(steps):.1f}x | "
                             f"{k['targets'].get('step_speedup_needed', 'n/a')}x |")
        for r in (rec.get("step") or {}).get("rows", []):
            if r["arm"] in ("fast", "plain") and r["setting"] in ("bf16_cl_graphs", "fp32") and (
                    r["model"] == "resnet50" or not rec.get("on_gpu")):
                mem = f", peak {r['peak_mem_MiB']:,.0f} MiB" if r.get("peak_mem_MiB") else ""
                lines.append(f"| {dev} | training step img/s: {r['arm']}, {r['model']} {r['crop']} px, "
                             f"B {r['batch']}, {r['setting']}{mem} | {_fmt(r['img_s'])} | |")
        for r in (rec.get("step") or {}).get("ratios", []):
            if r["ratio"] in ("vs_authors", "heated_over_plain", "graphs_vs_eager", "channels_last_vs_nchw") \
                    and r["arm"] in ("fast", "plain"):
                spread = f" ({_fmt(r['low'])} to {_fmt(r['high'])})" if "low" in r else ""
                lines.append(f"| {dev} | {r['ratio'].replace('_', ' ')}: {r['arm']}, {r['model']} "
                             f"{r['crop']} px, B {r['batch']}, {r['setting']} | {_fmt(r['value'])}{spread} | |")
        for tname, t in (rec.get("targets") or {}).items():
            if tname in STEP_TARGETS and t["value"] is not None:
                met = {True: "met", False: "NOT met", None: "(not a GPU)"}[t["met"]]
                lines.append(f"| {dev} | target {tname}: {t['where']} | {_fmt(t['value'])} | "
                             f"{t['needed']} {met} |")
        tr = rec.get("train") or {}
        if tr.get("last_epoch_step_img_s"):
            lines.append(f"| {dev} | `pgnm-fast train --amp --graphs` img/s, last epoch's steps | "
                         f"{_fmt(tr['last_epoch_step_img_s'])} | |")
    return "\n".join(lines)


def page(check: bool = False, path: Path = PAGE) -> int:
    """Rewrite the performance table between the markers of ``path`` (module docstring)."""
    records = [(p.name, _load(p)) for p in sorted((ROOT / "bench" / "results").glob("*.json"))]
    body = "Targets:\n\n" + targets_table() + "\n\nMeasured:\n\n" + table([(n, r) for n, r in records if r])
    text = path.read_text() if path.exists() else f"# Performance\n\n{START}\n{END}\n"
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if START not in text or END not in text:
        print(f"Error: {name} has no performance markers ({START} ... {END})", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    new = head + START + "\n" + body + "\n" + END + rest.split(END, 1)[1]
    if check:
        return 0 if path.exists() and new == path.read_text() else 1
    if not path.exists() or new != path.read_text():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(new)
        os.replace(tmp, path)
    print(f"{name}: performance table from {len(records)} record(s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--raw", required=True)
    r.add_argument("--tag", required=True)
    r.add_argument("--out", required=True)
    m = sub.add_parser("table", aliases=["readme"], help="the performance table of docs/performance.md")
    m.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd in ("table", "readme"):
        return page(args.check)
    rec = merge(_load(args.out), record(args.raw, args.tag))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    for name, t in rec["targets"].items():
        print(f"  {name}: {_fmt(t['value'])} (needed {t['needed']}; met: {t['met']})")
    for f in rec["step"].get("ratios", []):
        print(f"  {f['ratio']}: {f['model']} B={f['batch']} {f['arm']} {f['setting']}: {f['value']:.2f}")
    failed = {k: v for k, v in rec["exit_status"].items() if v not in (0, 5)}
    print(f"  steps: {rec['exit_status']}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
