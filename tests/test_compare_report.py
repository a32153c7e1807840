"""compare's report from simulated test logits: what it prints, records and draws."""
import json

import numpy as np
import pytest
from test_compare import _logits

from pgnm_fast.compare import make_plan
from pgnm_fast.compare_report import build_report, chart_intervals, format_report, write_compare_chart
from pgnm_fast.metrics import classification_metrics, json_safe, paired_bootstrap


def _report(classes, seeds, layout, accuracy=(0.6, 0.7), images=200, seconds=None):
    rng = np.random.default_rng(classes * 10 + seeds)
    labels = rng.integers(0, classes, images)
    logits, per_seed = {"baseline": [], "pgnm": []}, {}
    for s in range(seeds):
        a, b = (_logits(labels, acc, classes, rng) for acc in accuracy)
        logits["baseline"].append(a)
        logits["pgnm"].append(b)
        per_seed[str(s)] = {"test": {name: json_safe(classification_metrics(x, labels)[0])
                                     for name, x in (("baseline", a), ("pgnm", b))},
                            "bootstrap": paired_bootstrap(a, b, labels, 100, s), "runs": {}}
    plan = make_plan("tiny", {"epochs": 2, "grid": 8}, {"epochs": 1})
    seconds = seconds or {str(s): {"heated": 30.0 + s, "finetune": 10.0, "baseline": 0.0}
                          for s in range(seeds)}
    return build_report(per_seed, logits, labels, 100, list(range(seeds)), plan, "last", False,
                        seconds, layout=layout)


def test_three_classes_print_no_top5_and_no_reference_line():
    report = _report(3, 3, "folders")
    text = "\n".join(format_report(report))
    assert "top5" not in text and "top5" not in json.dumps(report)
    assert "top5" not in report["metrics"] and "top1" in report["metrics"]
    assert "reference, authors" not in text and "0.5468" not in text
    assert "reference not shown" in text and "RadImageNet" in text and "3 classes" in text
    assert report["reference"] is None


def test_radimagenet_layout_prints_the_reference_line_and_top5_with_13_classes():
    report = _report(13, 3, "radimagenet")
    text = "\n".join(format_report(report))
    assert "reference, authors" in text and "0.5468" in text and "reference not shown" not in text
    assert "top5" in report["metrics"] and any(line.startswith("top5") for line in text.split("\n"))
    # 165 classes are RadImageNet's whatever the layout (a packed cache of it)
    from pgnm_fast.compare_report import is_radimagenet
    assert is_radimagenet("packed", 165) and not is_radimagenet("folders", 13)


def test_two_seeds_say_the_interval_over_seeds_is_not_informative():
    report = _report(4, 2, "folders", accuracy=(0.05, 0.97))  # a difference near +1
    text = "\n".join(format_report(report))
    assert "not informative" in text and "[95% CI, test images]" in text
    assert report["interval_over_seeds_informative"] is False
    d = report["difference"]["top1"]
    row = next(line for line in text.split("\n") if line.startswith("top1"))
    lo, hi = d["ci95_images"]
    assert f"[{lo:+.4f}, {hi:+.4f}]" in row
    assert all(f"{x:+.4f}" in row for x in d["per_seed"])
    for key, entry in report["difference"].items():
        for ci in (entry["ci95"], entry.get("ci95_images")):
            assert ci is None or -1 <= ci[0] <= ci[1] <= 1, (key, ci)
    for arm in ("baseline", "pgnm"):
        for s in report["test"][arm].values():
            assert s["ci95"] is None or 0 <= s["ci95"][0] <= s["ci95"][1] <= 1


@pytest.mark.parametrize("seeds", [2, 3])
def test_chart_whiskers_stay_in_the_range(seeds, tmp_path):
    report = _report(4, seeds, "folders", accuracy=(0.02, 0.99), images=60)
    keys = report["metrics"]
    arms, (mid, lo, hi) = chart_intervals(report, keys)
    for ends in arms.values():
        assert (ends >= 0).all() and (ends <= 1).all()
    assert (lo >= -1).all() and (hi <= 1).all() and (lo <= mid + 1e-12).all()
    assert write_compare_chart(report, tmp_path / "c.png").stat().st_size > 10_000


def test_wall_times_per_stage_per_seed_and_the_sum_named():
    report = _report(3, 2, "folders",
                     seconds={"0": {"heated": 30.0, "finetune": 10.0, "baseline": 0.0},
                              "1": {"heated": 200.0, "finetune": 12.0, "baseline": 20.0}})
    text = format_report(report)
    assert "wall time, seed 0: heated 30 s, finetune 10 s, baseline reused" in text
    assert "wall time, seed 1: heated 3.3 min, finetune 12 s, baseline 20 s" in text
    assert "wall time, summed over the 2 seeds: heated 3.8 min, finetune 22 s, baseline 20 s" \
        in text


def test_seed_bootstrap_keys_explain_themselves():
    report = _report(3, 1, "folders")
    boot = report["per_seed"]["0"]["bootstrap"]["top1"]
    assert set(boot) == {"difference", "ci95", "fraction_of_resamples_pgnm_ahead"}
    assert 0 <= boot["fraction_of_resamples_pgnm_ahead"] <= 1


def _documented():
    from pathlib import Path
    return (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()


def test_every_key_of_compare_json_is_documented():
    doc = _documented()
    report = json.loads(json.dumps(_report(13, 3, "radimagenet")))
    seed = report["per_seed"]["0"]
    keys = (set(report) | set(report["difference"]["top1"]) | set(report["test"]["pgnm"]["top1"])
            | set(seed) | set(seed["bootstrap"]["top1"]) | set(report["epochs"]["pgnm"]))
    missing = sorted(k for k in keys if not any(
        form.format(k) in doc for form in ("`{}`", ".{}`", ".{},", "`{}.", ".{}.")))
    assert not missing, missing
    assert "b_ahead" not in json.dumps(report)


def test_every_key_of_the_eval_json_is_documented():
    from pgnm_fast.evaluate import eval_record
    from pgnm_fast.metrics import METRIC_KEYS
    record = eval_record({k: 0.5 for k in METRIC_KEYS}, "x.pt", "test",
                         {"data": "/d", "transforms": {"resize_size": 1, "crop_size": 1,
                                                       "mean": 0, "std": 1, "channels": 1}},
                         ["a"], [])
    doc = _documented()
    keys = set(record) | set(record["transforms"])
    assert not sorted(k for k in keys if f"`{k}`" not in doc)


def test_report_names_the_starting_weights_stage_settings_and_unequal_lr():
    from pgnm_fast.compare_report import format_report as fmt
    report = _report(4, 3, "folders")
    assert report["initial_checkpoint"] is None and report["arms_differ_in_lr"] is False
    report.update(initial_checkpoint={"path": "/w/model", "sha256": "ab" * 32},
                  stage_settings={"heated": {"lr": 0.05}, "finetune": {}, "baseline": {}},
                  lr_per_image={"heated": 0.05 / 32, "finetune": 0.01 / 32, "baseline": 0.1 / 32},
                  arms_differ_in_lr=True)
    text = "\n".join(fmt(report))
    assert f"both arms start from /w/model (sha256 {'ab' * 32})" in text
    assert "per-stage settings: heated.lr=0.05" in text
    assert "lr per image: heated 0.001563, finetune 0.0003125, baseline 0.003125" in text
    assert "THE ARMS DIFFER IN LR" in text
    report["arms_differ_in_lr"] = False
    assert "DIFFER" not in "\n".join(fmt(report))
