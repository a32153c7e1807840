"""transfer's report from runs written by hand: paired differences, tables, chart."""
import numpy as np
import pytest
from scipy import stats

from pgnm_fast.transfer_report import (
    SCORE_KEYS,
    format_table,
    paired_differences,
    summaries,
    write_transfer_chart,
)


def _run(name, n, repeat, f1, **other):
    scores = {k: 0.5 for k in SCORE_KEYS} | {"f1_macro": f1} | other
    return {"checkpoint": name, "n": n, "repeat": repeat, **scores}


def _report(runs, repeats, reference, names=("a", "b")):
    settings = {"repeats": repeats, "classes": ["x", "y", "z"], "probe": True, "steps": 2}
    return {"settings": settings, "runs": runs, **summaries(runs, reference)}


def test_paired_difference_matches_a_hand_computation():
    a = [0.50, 0.60, 0.55, 0.70]
    b = [0.58, 0.61, 0.65, 0.69]
    runs = [_run("a", 16, r, x) for r, x in enumerate(a)] + \
        [_run("b", 16, r, x) for r, x in enumerate(b)] + [_run("b", 32, 0, 0.9)]  # no pair: left out
    d = paired_differences(runs, "a")
    cell = d["b"]["16"]["f1_macro"]
    hand = [0.08, 0.01, 0.10, -0.01]
    assert cell["per_repeat"] == pytest.approx(hand) and cell["repeats"] == [0, 1, 2, 3]
    assert cell["difference"] == pytest.approx(0.045)
    # far from the ends of [-1, 1] the interval is the paired t-interval
    half = stats.t.ppf(0.975, 3) * np.std(hand, ddof=1) / 2
    assert cell["ci95"] == pytest.approx([0.045 - half, 0.045 + half], abs=1e-3)
    assert "a" not in d and "32" not in d["b"]
    # the other way round: the same differences with the sign flipped
    back = paired_differences(runs, "b")["a"]["16"]["f1_macro"]
    assert back["per_repeat"] == pytest.approx([-x for x in hand])


def test_differences_near_one_stay_in_range_and_tables_name_both_sides():
    runs = [_run("a", 8, r, x) for r, x in enumerate([0.01, 0.02, 0.0])] + \
        [_run("b", 8, r, x) for r, x in enumerate([0.99, 1.0, 0.97])]
    report = _report(runs, 3, "a")
    cell = report["differences"]["b"]["8"]["f1_macro"]
    assert -1 <= cell["ci95"][0] <= cell["difference"] <= cell["ci95"][1] <= 1
    s = report["summary"]["b"]["8"]["f1_macro"]
    assert 0 <= s["ci95"][0] <= s["ci95"][1] <= 1
    text = "\n".join(format_table(report))
    assert "paired difference against a" in text and "b - a" in text and "[95% CI]" in text


def test_two_repeats_show_the_repeats_not_an_interval():
    runs = [_run(name, 8, r, x) for name, xs in (("a", [0.4, 0.5]), ("b", [0.45, 0.62]))
            for r, x in enumerate(xs)]
    text = "\n".join(format_table(_report(runs, 2, "a")))
    assert "not informative" in text and "(each repeat)" in text
    assert "0.4500 (0.4000, 0.5000)" in text and "+0.0850 (+0.0500, +0.1200)" in text


def test_chart_with_four_checkpoints_has_a_difference_row(tmp_path):
    rng = np.random.default_rng(0)
    runs = [_run(name, n, r, float(rng.uniform(0.3, 0.9))) for name in "abcd"
            for n in (8, 16, 32) for r in range(3)]
    path = write_transfer_chart(_report(runs, 3, "c"), tmp_path / "t.png")
    from PIL import Image
    with Image.open(path) as im:
        width, height = im.size
    assert height > 0.5 * width  # two rows of panels, not one


def test_every_key_of_transfer_json_is_documented():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    runs = [_run(name, 8, r, 0.5, train_loss=1.0, seconds=2.0) for name in "ab" for r in range(3)]
    report = _report(runs, 3, "a")
    cell = report["differences"]["b"]["8"]["f1_macro"]
    keys = (set(report) | set(runs[0]) | set(cell) | set(report["summary"]["a"]["8"]["f1_macro"])
            | {"trained", "reused", "seconds"})
    missing = sorted(k for k in keys if not any(
        form.format(k) in doc for form in ("`{}`", ".{}`", "`{}.", ".{}.")))
    assert not missing, missing
    import inspect

    from pgnm_fast import transfer
    settings = inspect.getsource(transfer.transfer).split("settings = {")[1].split("}\n")[0]
    import re
    for key in re.findall(r'"(\w+)":', settings):
        assert f"`settings.{key}`" in doc or f".{key}`" in doc or f".{key}," in doc, key
