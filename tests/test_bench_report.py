"""The GPU proof's pieces that run anywhere: the step ratios, the targets, the performance table
(docs/performance.md), and
the modules bench/run_gpu.sh needs importing without scipy, scikit-learn or DALI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_step  # noqa: E402
import report  # noqa: E402


def _row(arm, setting, seconds, batch=256, model="resnet50"):
    return ({"model": model, "crop": 224, "batch": batch, "arm": arm, "setting": setting}, seconds)


def test_ratios_compare_the_right_arms():
    rows = [_row("authors", "fp32", 1.0), _row("plain", "bf16_cl_graphs", 0.04),
            _row("fast", "bf16_cl_graphs", 0.05), _row("fast", "bf16_cl", 0.08),
            _row("reference", "bf16_cl", 0.1), _row("plain", "bf16_cl", 0.07)]
    got = {(r["ratio"], r["arm"], r["setting"]): r["value"] for r in bench_step.ratios(rows)}
    assert got[("vs_authors", "fast", "bf16_cl_graphs")] == pytest.approx(20.0)
    assert got[("heated_over_plain", "fast", "bf16_cl_graphs")] == pytest.approx(1.25)
    assert got[("graphs_vs_eager", "fast", "bf16_cl_graphs")] == pytest.approx(1.6)
    assert got[("graphs_vs_eager", "plain", "bf16_cl_graphs")] == pytest.approx(0.07 / 0.04)
    assert got[("vs_reference", "fast", "bf16_cl")] == pytest.approx(1.25)
    assert ("vs_reference", "fast", "bf16_cl_graphs") not in got  # no reference with graphs
    assert not any(arm in ("plain", "authors") and name != "graphs_vs_eager"
                   for name, arm, _ in got)


@pytest.mark.parametrize("img_s,plain_s,met", [(5000.0, 0.045, True), (4000.0, 0.045, False)])
def test_targets_met_or_not_on_a_gpu_only(img_s, plain_s, met):
    t_fast = 256 / img_s
    rows = [dict(r[0], seconds_per_step=r[1], img_s=r[0]["batch"] / r[1]) for r in
            [_row("fast", "bf16_cl_graphs", t_fast), _row("plain", "bf16_cl_graphs", plain_s),
             _row("authors", "fp32", 1.0)]]
    step = {"rows": rows, "ratios": bench_step.ratios([(r, r["seconds_per_step"]) for r in rows])}
    gpu = report.targets(step, on_gpu=True)
    assert gpu["heated_img_s"]["met"] is met and gpu["heated_img_s"]["value"] == pytest.approx(img_s)
    assert gpu["heated_over_plain"]["met"] is (t_fast / plain_s <= 1.3)
    assert gpu["fused_vs_authors"]["met"] is True
    assert gpu["graphs_vs_eager_b32"] == {**gpu["graphs_vs_eager_b32"], "value": None, "met": None}
    assert all(t["met"] is None for t in report.targets(step, on_gpu=False).values())


def test_step_figures_spread_brackets_the_ratio(tmp_path):
    def bench(arm, median, q1, q3):
        info = {"op": "train_step", "model": "resnet10t", "crop": 64, "batch": 16, "arm": arm,
                "setting": "fp32", "seconds_per_step": median, "img_s": 16 / median}
        return {"extra_info": info, "stats": {"median": median, "q1": q1, "q3": q3, "rounds": 3}}
    figs = report.step_figures({"benchmarks": [bench("plain", 0.1, 0.09, 0.12),
                                               bench("fast", 0.2, 0.18, 0.25)]})
    (r,) = [r for r in figs["ratios"] if r["ratio"] == "heated_over_plain"]
    assert r["value"] == pytest.approx(2.0)
    assert r["low"] == pytest.approx(0.18 / 0.12) and r["high"] == pytest.approx(0.25 / 0.09)


def test_performance_table_is_generated_from_the_records():
    p = subprocess.run([sys.executable, "bench/report.py", "table", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, "docs/performance.md's table is stale: python bench/report.py table"
    text = (ROOT / "docs" / "performance.md").read_text()
    assert report.START in text and report.END in text


def test_performance_page_is_made_with_its_markers_and_every_target(tmp_path):
    page = tmp_path / "docs" / "performance.md"
    assert report.page(check=True, path=page) == 1  # missing: not what the records give
    assert report.page(path=page) == 0
    text = page.read_text()
    assert text.startswith("# Performance\n") and report.START in text and report.END in text
    for name, target in report.TARGETS.items():
        assert f"| `{name}` |" in text and target.needed_text in text
    assert report.page(check=True, path=page) == 0
    page.write_text(text.replace(report.END, "stale row\n" + report.END))
    assert report.page(check=True, path=page) == 1
    page.write_text("# Performance\n")
    assert report.page(path=page) == 2  # markers removed: one error line, nothing written
    assert page.read_text() == "# Performance\n"


POISON = """
import sys
for name in ("scipy", "sklearn", "nvidia", "nvidia.dali"):
    sys.modules[name] = None  # importing any of them now fails
sys.path.insert(0, "bench")
import pgnm_fast.cli, pgnm_fast.stages, pgnm_fast.validate, pgnm_fast.speed, pgnm_fast.graphs
import pgnm_fast.self_check
import conftest, bench_step, bench_kernels, report
from pgnm_fast.pipelines.factory import resolve_backend
assert resolve_backend("auto", log=lambda s: None) == "torch"
print("ok")
"""


@pytest.mark.slow
def test_what_the_gpu_proof_imports_needs_no_scipy_sklearn_or_dali():
    p = subprocess.run([sys.executable, "-c", POISON], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.slow
def test_benchmark_refuses_a_device_it_cannot_find():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_step.py", "--benchmark-only",
                        "--bench-device", "cuda", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "Error: --bench-device cuda: no CUDA device is visible to torch" in p.stdout + p.stderr
    assert json.dumps(p.stdout).count("Traceback") == 0
