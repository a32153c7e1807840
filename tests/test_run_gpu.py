"""bench/run_gpu.sh and what it leans on, checked without a GPU: the time-boxes add up to the
durations its header states, the GPU test and benchmark modules import where DALI is missing, the
step benchmark times the targets' cases first and keeps each case's figures as it ends, and the
record keeps what a time-box or a partial run left."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_step  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402

DEFAULT_STEPS_S = 9 * 60  # "the default steps finish in under 9 minutes" (bench/run_gpu.sh's header)
OVERHEAD_S = 60  # the script's start and record, and one step's 10 s kill grace
LOADER_STEP_S = 3 * 60  # "the loader step in under 3"


def _plan(*args, device="cuda"):
    p = subprocess.run(["bash", "bench/run_gpu.sh", "--plan", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, DEVICE=device))
    assert p.returncode == 0, p.stderr
    rows = dict(line.split() for line in p.stdout.splitlines())
    return {k: int(v) for k, v in rows.items()}


def test_the_default_steps_time_boxes_finish_within_the_stated_duration():
    plan = _plan()
    assert set(plan) == {"tests", "validate", "bench", "step", "train", "total"}
    assert sum(v for k, v in plan.items() if k != "total") == plan["total"]
    assert plan["total"] + OVERHEAD_S <= DEFAULT_STEPS_S, plan
    assert all(v > 0 for v in plan.values())


def test_the_loader_step_finishes_within_its_stated_duration_and_compile_is_named_only():
    plan = _plan("loader")
    assert set(plan) == {"loader-tests", "loader-bench", "total"}
    assert plan["total"] <= LOADER_STEP_S, plan
    assert set(_plan("compile")) == {"compile", "total"}


def test_an_unknown_step_is_one_error_line():
    p = subprocess.run(["bash", "bench/run_gpu.sh", "--plan", "tset"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "'tset'" in p.stderr


def test_every_gpu_test_module_is_in_a_step():
    """A test module with GPU-only cases (``pytest.mark.gpu``) is run by some step of
    run_gpu.sh (test_dali.py needs DALI, which a GPU machine may lack: its own command)."""
    script = (ROOT / "bench" / "run_gpu.sh").read_text()
    gpu = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
           if "mark.gpu" in p.read_text()} - {"tests/pipelines/test_dali.py"}
    assert gpu and not {f for f in gpu if f not in script}
    named = {w.split("::")[0] for w in script.split() if w.startswith(("tests/", "bench/")) and ".py" in w}
    assert all((ROOT / f).is_file() for f in named), named


def test_no_visible_gpu_stops_before_any_step_with_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, DEVICE="cuda")
    p = subprocess.run(["bash", "bench/run_gpu.sh", "tests"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 2 and "== tests" not in p.stdout
    assert p.stderr.strip().splitlines() == [
        f"run_gpu.sh: no CUDA device visible to {sys.executable} (DEVICE=cpu runs the CPU variant)"]


NO_DALI = """
import sys
for name in ("nvidia.dali", "nvidia.dali.plugin", "nvidia.dali.plugin.pytorch", "isal", "isal.isal_zlib"):
    sys.modules[name] = None  # importing any of them now fails, as where DALI and isal are not installed
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_gpu_test_and_benchmark_modules_collect_without_dali_or_isal():
    files = ["tests/kernels/test_kernels_gpu.py", "tests/kernels/test_resized_crop.py",
             "tests/test_graphs_gpu.py", "tests/pipelines/test_uint8_batches.py", "bench/bench_kernels.py",
             "bench/bench_step.py", "bench/bench_device_loader.py"]
    p = subprocess.run([sys.executable, "-c", NO_DALI, "--collect-only", "-q", "-p", "no:cacheprovider",
                        *files], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "error" not in p.stdout.lower().split("collected")[-1]


def test_gpu_step_cases_time_the_targets_first_and_they_give_every_target():
    cases = bench_step.cases("cuda")
    n = len(targets.STEP_TARGET_CASES)
    assert cases[:n] == targets.STEP_TARGET_CASES and len(set(cases)) == len(cases)
    rows = [dict(zip(("model", "crop", "grid", "batch", "arm", "setting"), c), seconds_per_step=0.05 + i / 100,
                 img_s=c[3] / (0.05 + i / 100)) for i, c in enumerate(targets.STEP_TARGET_CASES)]
    step = {"rows": rows, "ratios": bench_step.ratios([(r, r["seconds_per_step"]) for r in rows])}
    got = report.targets(step, on_gpu=True)
    assert all(t["value"] is not None for t in got.values()), got


def _bench(arm, median, batch=8):
    info = {"op": "train_step", "model": "resnet10t", "crop": 32, "batch": batch, "arm": arm,
            "setting": "fp32", "seconds_per_step": median, "img_s": batch / median}
    return {"extra_info": info, "stats": {"median": median, "q1": median * 0.9, "q3": median * 1.1, "rounds": 3}}


def test_record_takes_the_step_rows_when_a_time_box_stopped_the_json(tmp_path):
    rows = tmp_path / "dev-step-rows.jsonl"
    rows.write_text(json.dumps(_bench("plain", 0.1)) + "\n" + json.dumps(_bench("fast", 0.15)) + "\n"
                    + json.dumps(_bench("reference", 0.3))[:40])  # the last line cut by the kill
    (tmp_path / "dev-step.rc").write_text("124\n")
    rec = report.record(str(tmp_path), "dev")
    assert {r["arm"] for r in rec["step"]["rows"]} == {"plain", "fast"}
    (ratio,) = [r for r in rec["step"]["ratios"] if r["ratio"] == "heated_over_plain"]
    assert ratio["value"] == pytest.approx(1.5)
    assert rec["exit_status"] == {"step": 124}


def test_a_partial_run_keeps_the_earlier_records_parts(tmp_path):
    (tmp_path / "dev-step.json").write_text(json.dumps({"benchmarks": [_bench("plain", 0.1), _bench("fast", 0.2)]}))
    (tmp_path / "dev-step.rc").write_text("0\n")
    first = report.record(str(tmp_path), "dev")
    for p in tmp_path.iterdir():
        p.unlink()
    (tmp_path / "dev-loader.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_images_per_second[device]", "extra_info": {"images_per_s": 51000.0}}]}))
    (tmp_path / "dev-loader-bench.rc").write_text("0\n")
    merged = report.merge(first, report.record(str(tmp_path), "dev"))
    assert merged["step"] == first["step"] and merged["exit_status"] == {"step": 0, "loader-bench": 0}
    assert merged["loader"]["test_images_per_second[device]"]["images_per_s"] == 51000.0
    assert report.merge(dict(first, tag="other"), merged) is merged  # another tag: nothing kept


@pytest.mark.slow
def test_step_benchmark_appends_each_case_as_it_ends(tmp_path):
    rows = tmp_path / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PGNM_BENCH_QUICK="1", PGNM_BENCH_ROWS=str(rows),
               PGNM_BENCH_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_step.py", "-q", "-p", "no:cacheprovider",
                        "--benchmark-only", "--bench-device", "cpu", "-k", "plain or fast"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:]
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [g["extra_info"]["arm"] for g in got] == ["plain", "fast"]
    assert all(g["stats"]["rounds"] == 3 and g["stats"]["q1"] <= g["stats"]["median"] <= g["stats"]["q3"]
               for g in got)


def test_a_gpu_record_from_the_target_cases_renders_in_the_performance_table(tmp_path):
    """The record of a GPU run whose step stopped after the targets' cases: every target is
    measured and judged, and the performance table names each figure."""
    rows = []
    for i, (model, crop, grid, batch, arm, setting) in enumerate(targets.STEP_TARGET_CASES):
        t = 0.05 + i / 100
        info = {"op": "train_step", "model": model, "crop": crop, "grid": grid, "batch": batch, "arm": arm,
                "setting": setting, "device": "cuda", "seconds_per_step": t, "img_s": batch / t,
                "peak_mem_MiB": 1000.0 + i}
        rows.append(json.dumps({"extra_info": info, "stats": {"median": t, "q1": t, "q3": t, "rounds": 3}}))
    (tmp_path / "gpu-step-rows.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "gpu-step.rc").write_text("124\n")
    rec = report.record(str(tmp_path), "gpu")
    rec["on_gpu"], rec["device_name"] = True, "NVIDIA H200"
    rec["targets"] = report.targets(rec["step"], on_gpu=True)
    assert all(t["met"] is not None for t in rec["targets"].values()), rec["targets"]
    table = report.table([("gpu.json", rec)])
    for name in report.STEP_TARGETS:
        assert f"target {name}" in table
    assert "training step img/s: fast, resnet50 224 px, B 256, bf16_cl_graphs, peak 1,000 MiB" in table
