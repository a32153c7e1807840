"""The fast paths' self-check (pgnm_fast.self_check): it passes on the CPU for every part, each
part fails when its fast path is made wrong, a failure turns into its fallback and one line, and
the cached verdict is used again only for the same device, driver, torch and Triton."""
import json
from types import SimpleNamespace

import pytest
import torch

from pgnm_fast import self_check as sc
from pgnm_fast.graphs import GraphedStep
from pgnm_fast.kernels import FastMasker
from pgnm_fast.pipelines import augment

USES_ALL = SimpleNamespace(impl="fast", graphs=True, loader="device", self_check=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path / "cache"))


def _counting(monkeypatch):
    """Count the runs of each part's check."""
    runs = []
    for part, check in dict(sc.CHECKS).items():
        monkeypatch.setitem(sc.CHECKS, part, lambda dev, _c=check, _p=part: runs.append(_p) or _c(dev))
    return runs


def test_every_part_passes_on_the_cpu_and_the_verdict_is_cached(monkeypatch):
    logs = []
    rng = torch.get_rng_state()
    result = sc.run_self_check("cpu", log=logs.append)
    assert result.ok and not result.cached and set(result.parts) == set(sc.PARTS), result
    assert all(r.ok and r.error == "" and r.seconds > 0 for r in result.parts.values())
    assert torch.equal(torch.get_rng_state(), rng)  # the checks leave torch's random state alone
    assert len(logs) == 1 and "sample_score ok, apply ok, resized_crop ok, graphed_step ok" in logs[0]
    stored = json.loads(result.path.read_text())
    assert stored["key"] == sc.device_key("cpu") and set(stored["parts"]) == set(sc.PARTS)
    assert result.path.parent == sc.cache_path(result.key).parent and result.path.name.endswith(".json")
    runs = _counting(monkeypatch)
    again = sc.run_self_check("cpu", log=logs.append)
    assert again.cached and again.ok and runs == [] and len(logs) == 1  # read, not run, nothing said
    assert sc.apply_fallbacks(again, USES_ALL) == ({}, [])


def test_a_new_torch_or_triton_version_checks_again(monkeypatch):
    runs = _counting(monkeypatch)
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    assert runs == ["apply"]
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    assert runs == ["apply", "apply"]
    monkeypatch.setattr(sc, "_triton_version", lambda: "0.0.1")
    key = sc.device_key("cpu")
    assert key["torch"] == "9.9.9" and key["triton"] == "0.0.1"
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    assert runs == ["apply"] * 3
    # a part not checked before runs alone; the cached one is read
    sc.run_self_check("cpu", log=lambda line: None, parts=("apply", "resized_crop"))
    assert runs == ["apply"] * 3 + ["resized_crop"]


def test_a_damaged_or_foreign_cache_file_checks_again(monkeypatch):
    runs = _counting(monkeypatch)
    path = sc.cache_path(sc.device_key("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert sc.run_self_check("cpu", log=lambda line: None, parts=("resized_crop",)).ok
    data = json.loads(path.read_text())
    data["key"]["driver"] = "other"
    path.write_text(json.dumps(data))
    sc.run_self_check("cpu", log=lambda line: None, parts=("resized_crop",))
    assert runs == ["resized_crop", "resized_crop"]


def _fails(part, monkeypatch, match):
    logs = []
    result = sc.run_self_check("cpu", log=logs.append, parts=(part,), cache=False)
    assert not result.ok and result.failed().keys() == {part} and result.path is None
    assert match in result.failed()[part], result.failed()
    assert f"{part} FAILED" in logs[0]
    changes, lines = sc.apply_fallbacks(result, USES_ALL)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert part in lines[0] and result.failed()[part] in lines[0]
    assert "pgnm-fast validate --device cuda" in lines[0]
    return changes


def test_a_wrong_apply_falls_back_to_the_reference(monkeypatch):
    real = FastMasker.apply
    monkeypatch.setattr(FastMasker, "apply", lambda self, x, m: real(self, x, m) * 1.001)
    assert _fails("apply", monkeypatch, "x its bound") == {"impl": "reference"}


def test_a_wrong_score_falls_back_to_the_reference(monkeypatch):
    real = FastMasker.sample_score

    def off(self, a, b):
        m, s = real(self, a, b)
        return m, s * 1.0001

    monkeypatch.setattr(FastMasker, "sample_score", off)
    assert _fails("sample_score", monkeypatch, "scores") == {"impl": "reference"}


def test_a_wrong_sampler_law_fails_the_sample_score_part(monkeypatch):
    real = FastMasker.sample_score

    def squared(self, a, b):  # m^2: the right scores of the wrong law
        m, s = real(self, a, b)
        return m * m, s

    monkeypatch.setattr(FastMasker, "sample_score", squared)
    assert _fails("sample_score", monkeypatch, "sampling at alpha") == {"impl": "reference"}


def test_a_wrong_resize_falls_back_from_the_device_loader(monkeypatch):
    real = augment.resized_crop

    def shifted(out, *args, impl="auto", **kwargs):
        real(out, *args, impl=impl, **kwargs)
        return out if impl == "torch" else out.add_(0.1)

    monkeypatch.setattr(augment, "resized_crop", shifted)
    assert _fails("resized_crop", monkeypatch, "grey levels") == {"loader": "auto"}


def test_validate_fails_on_a_wrong_resize_too(monkeypatch, tmp_path):
    """``pgnm-fast validate``, the full check the fallback lines name, covers the resize too."""
    from click.testing import CliRunner

    from pgnm_fast.cli import validate
    real = augment.resized_crop
    monkeypatch.setattr(augment, "resized_crop", lambda out, *a, impl="auto", **k: real(
        out, *a, impl=impl, **k) if impl == "torch" else real(out, *a, impl=impl, **k).add_(0.1))
    path = tmp_path / "v.json"
    result = CliRunner().invoke(validate, ["--device", "cpu", "--quick", "--seed", "2", "--json", str(path)])
    assert result.exit_code == 1 and result.output.rstrip().endswith("FAILED"), result.output
    assert "resized crop (the device loader's resize against its integer reference): FAIL (" in result.output
    data = json.loads(path.read_text())
    assert data["passed"] is False and data["apply"]["passed"] is True
    assert data["other_fast_paths"]["resized_crop"]["ok"] is False


def test_a_replay_that_reads_the_wrong_input_turns_graphs_off(monkeypatch):
    real = GraphedStep.__call__
    monkeypatch.setattr(GraphedStep, "__call__",
                        lambda self, images, target, stats: real(self, images.flip(-1), target, stats))
    assert _fails("graphed_step", monkeypatch, "from the eager step's") == {"graphs": False}


def test_a_part_that_raises_fails_with_its_error(monkeypatch):
    def broken(device):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setitem(sc.CHECKS, "apply", broken)
    result = sc.run_self_check("cpu", log=lambda line: None, parts=("apply",))
    assert result.failed() == {"apply": "RuntimeError: no kernel image is available for execution on the device"}
    # the failure is cached too: the next run with the same key falls back without checking
    monkeypatch.setitem(sc.CHECKS, "apply", lambda device: pytest.fail("checked again"))
    assert sc.run_self_check("cpu", log=lambda line: None, parts=("apply",)).failed().keys() == {"apply"}


def test_fallbacks_touch_only_what_the_run_uses():
    failed = sc.SelfCheckResult(key={"device": "GPU X"}, parts={
        p: sc.PartResult(ok=False, error=f"{p} broke") for p in sc.PARTS})
    changes, lines = sc.apply_fallbacks(failed, USES_ALL)
    assert changes == {"impl": "reference", "graphs": False, "loader": "auto"} and len(lines) == 4
    assert all("on GPU X" in line for line in lines)
    plain = SimpleNamespace(impl="reference", graphs=False, loader="torch")
    assert sc.apply_fallbacks(failed, plain) == ({}, [])
    assert sc.parts_for(plain) == ()
    assert sc.parts_for(USES_ALL) == sc.PARTS
    assert sc.parts_for(SimpleNamespace(impl="fast", graphs=False, loader="auto")) == ("sample_score", "apply")


def test_the_training_call_checks_on_cuda_only_and_not_when_turned_off(monkeypatch):
    monkeypatch.setattr(sc, "run_self_check", lambda *a, **k: pytest.fail("checked"))
    assert sc.check_and_fall_back(USES_ALL, "cpu", log=print) == {}
    off = SimpleNamespace(**{**vars(USES_ALL), "self_check": False})
    assert sc.check_and_fall_back(off, "cuda", log=print) == {}


def test_the_training_call_returns_the_changes_and_logs_each_line(monkeypatch):
    failed = sc.SelfCheckResult(key={"device": "GPU X"}, parts={
        "sample_score": sc.PartResult(ok=True), "apply": sc.PartResult(ok=False, error="bad"),
        "resized_crop": sc.PartResult(ok=True), "graphed_step": sc.PartResult(ok=True)})
    asked = []
    monkeypatch.setattr(sc, "run_self_check", lambda device, log, parts: asked.append(parts) or failed)
    logs = []
    assert sc.check_and_fall_back(USES_ALL, "cuda", log=logs.append) == {"impl": "reference"}
    assert asked == [sc.PARTS] and len(logs) == 1
    assert logs[0].startswith("self-check: apply failed on GPU X (bad); running with --impl reference")


def test_an_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown self-check part"):
        sc.run_self_check("cpu", parts=("sample",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_self_check_passes_on_the_gpu():
    logs = []
    result = sc.run_self_check("cuda", log=logs.append, cache=False)
    assert result.ok, result.failed()
    assert result.key["device"] == torch.cuda.get_device_name() and result.key["driver"]
