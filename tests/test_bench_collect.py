"""`pytest bench --benchmark-only` (the benchmark command of docs/performance.md) finds the
benchmarks."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pytest_bench_collects_every_benchmark_module():
    p = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only",
                        "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for module in sorted((ROOT / "bench").glob("bench_*.py")):
        assert f"bench/{module.name}::" in p.stdout, module.name
