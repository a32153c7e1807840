"""The Python API (pgnm_fast.api, docs/api.md): imported lazily, arguments checked as the flags
are before anything runs, weights of every form into a model, and the docs page's examples run
as they stand."""
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pgnm_fast
from pgnm_fast import api
from pgnm_fast.errors import CheckpointError, ConfigError
from pgnm_fast.models import create_model as fresh_model

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_loads_no_torch_until_a_function_runs():
    out = _python("import sys, pgnm_fast; print('torch' in sys.modules); "
                  "f = [pgnm_fast.train, pgnm_fast.create_model, pgnm_fast.TrainConfig]; "
                  "print('torch' in sys.modules, sorted(pgnm_fast.__all__))")
    before, after = out.splitlines()
    assert before == "False" and after.startswith("False "), out
    for name in ("train", "compare", "transfer", "evaluate", "predict", "load_weights",
                 "create_model", "TrainConfig", "make_config"):
        assert repr(name) in after and callable(getattr(pgnm_fast, name))


def test_compare_transfer_evaluate_are_the_modules_and_call_the_api():
    # in a fresh process, whichever is imported first: the module, callable as the API function
    out = _python("from pgnm_fast import train, compare; import pgnm_fast.transfer as t; "
                  "from pgnm_fast import evaluate, transfer; "
                  "print(callable(compare), hasattr(compare, 'make_plan'), t is transfer, "
                  "callable(transfer), hasattr(evaluate, 'evaluate_checkpoint'))")
    assert out == "True True True True True"
    assert inspect.signature(pgnm_fast.compare) == inspect.signature(api.compare)
    with pytest.raises(ConfigError, match=r"compare\(\): seeds must be positive"):
        pgnm_fast.compare(seeds=0)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        assert pgnm_fast.trian is None  # a misspelt name: AttributeError, not None


@pytest.mark.parametrize("call, message", [
    (lambda out: api.train(out=out, epochs=0), r"train\(\): epochs must be positive, not 0"),
    (lambda out: api.train(out=out, batch_size=1), r"batch_size must be at least 2"),
    (lambda out: api.train(out=out, lr="0.1"), r"lr must be float, not '0.1'"),
    (lambda out: api.train(out=out, model="vit"), r"model must be one of resnet10t, resnet18"),
    (lambda out: api.train(out=out, epoch=2), r"unknown setting 'epoch'"),
    (lambda out: api.train(out=out, overrides={"epochs": 2}), r"unknown setting 'overrides'"),
    (lambda out: api.train("warm", out=out), r"unknown stage 'warm'"),
    (lambda out: api.train(out=out, img_size=0), r"img_size must be positive"),
    (lambda out: api.compare(out=out, finetune_from="middle"), r"finetune_from must be one of last"),
    (lambda out: api.compare(out=out, finetune_overrides={"lr": -1.0}), r"lr must be positive"),
    (lambda out: api.compare(out=out, resamples=0), r"resamples must be positive"),
    (lambda out: api.transfer("a.pt", out, shots="ten", out=out), r"--shots must be comma-separated"),
    (lambda out: api.transfer("a.pt", out, batch_size=1, out=out), r"batch_size must be at least 2"),
    (lambda out: api.transfer("a.pt", out, loader="fast", out=out), r"loader must be one of auto"),
    (lambda out: api.transfer("a.pt", out, crop=3, out=out), r"unknown argument 'crop'"),
    (lambda out: api.evaluate("a.pt", out, batch_size=0), r"batch_size must be positive"),
    (lambda out: api.evaluate("a.pt", out, all_scores=True), r"all_scores adds columns"),
    (lambda out: api.evaluate("a.pt", out, threads=0), r"threads must be positive"),
    (lambda out: api.create_model("resnet18"), r"model_name and num_classes are needed"),
    (lambda out: api.create_model("vit", num_classes=2), r"model_name must be one of"),
])
def test_a_bad_argument_is_one_line_before_anything_runs(call, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as caught:
        call(out)
    assert "\n" not in str(caught.value) and not out.exists()


def test_train_takes_a_config_file_beneath_its_keywords(tmp_path, monkeypatch):
    import pgnm_fast.stages
    seen = {}
    monkeypatch.setattr(pgnm_fast.stages, "run_stage", lambda stage, **kw: seen.update(kw, stage=stage))
    config = tmp_path / "config.json"
    config.write_text('{"stage": "baseline", "epochs": 3, "lr": 1, "img_size": 40, '
                      '"val_crop_size": 36, "data": "somewhere", "preset": "paper"}')
    api.train("baseline", config_file=config, lr=0.5, batch_size=None, grid=None)
    assert seen["stage"] == "baseline" and seen["data"] == "somewhere" and seen["preset"] == "paper"
    assert seen["overrides"] == dict(epochs=3, lr=0.5, train_crop_size=40, val_crop_size=36,
                                     val_resize_size=46)  # the file's img_size, its own crop
    api.train("baseline", config_file=config, img_size=24, train_crop_size=32)  # img_size beats the file
    assert seen["overrides"] == dict(epochs=3, lr=1.0, train_crop_size=32, val_crop_size=24,
                                     val_resize_size=27)
    with pytest.raises(ConfigError, match="stage 'baseline', not 'heated'"):
        api.train("heated", config_file=config)


def test_compare_gives_settings_to_the_stages_as_the_command_does(monkeypatch):
    import pgnm_fast.compare
    seen = {}
    monkeypatch.setattr(pgnm_fast.compare, "compare", lambda *a, **kw: seen.update(kw, args=a))
    pgnm_fast.compare(data="d", seeds=2, epochs=3, batch_size=16, img_size=32, grid=8,
                      finetune_epochs=1, finetune_overrides={"lr": 0.02})
    assert seen["args"] == ("d", None, "tiny") and seen["seeds"] == 2
    crops = dict(train_crop_size=32, val_crop_size=32, val_resize_size=37)
    assert seen["overrides"] == dict(epochs=3, batch_size=16, grid=8, **crops)
    assert seen["finetune_overrides"] == dict(epochs=1, batch_size=16, lr=0.02, **crops)


def _saved(tmp_path, name="resnet10t", classes=5, chans=3):
    torch.manual_seed(0)
    model = fresh_model(name, classes, in_chans=chans).eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_create_model_loads_a_state_dict_as_it_is_or_fitted(tmp_path):
    source, path = _saved(tmp_path)
    w = pgnm_fast.load_weights(path)
    assert (w.kind, w.model_name, w.num_classes, w.in_chans) == ("state dict", "resnet10t", 5, 3)
    model = pgnm_fast.create_model(checkpoint_path=path, log=lambda s: None).eval()
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = source(image.expand(-1, 3, -1, -1))
        assert torch.allclose(model(image.expand(-1, 3, -1, -1)), expected, atol=1e-5)
        grey = pgnm_fast.create_model(checkpoint_path=path, in_chans=1, log=lambda s: None).eval()
        assert torch.allclose(grey(image), expected, atol=1e-4)  # summed stem, same logits
    lines = []
    new_head = pgnm_fast.create_model(checkpoint_path=path, num_classes=3, log=lines.append)
    assert new_head.fc.out_features == 3 and "new classifier head" in lines[0]
    assert torch.equal(new_head.state_dict()["layer1.0.conv1.weight"],
                       source.state_dict()["layer1.0.conv1.weight"])
    with pytest.raises(CheckpointError, match="do not fit resnet50"):
        pgnm_fast.create_model("resnet50", checkpoint_path=path)
    fresh = pgnm_fast.create_model("resnet18", num_classes=4)
    assert fresh.fc.out_features == 4 and fresh.conv1.in_channels == 1


DATA_LINE = 'data = make_synthetic("data/synth", images=240, size=40)'


@pytest.mark.slow
def test_the_api_page_runs_as_it_stands(small_data, tmp_path, monkeypatch, capsys):
    """docs/api.md's code blocks, in order, in an empty folder; the data line uses the tests'
    set of the same size (made once per session); the timm block runs where timm is installed."""
    page = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) >= 6 and DATA_LINE in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        if "import timm" in block and importlib.util.find_spec("timm") is None:
            continue
        exec(compile(block.replace(DATA_LINE, f"data = {str(small_data)!r}"), "docs/api.md", "exec"),
             namespace)
    out = capsys.readouterr().out
    assert "heated stage done" in out and "finetune stage done" in out and "macro F1 " in out
    assert "PGNM - baseline macro F1: " in out
    assert namespace["metrics"]["n_images"] > 0 and namespace["cfg"].epochs == 90
    assert (tmp_path / "runs" / "cmp" / "compare.json").is_file()
    assert (tmp_path / "runs" / "transfer" / "transfer.json").is_file()
    assert namespace["w"].num_classes == len(namespace["classes"])
