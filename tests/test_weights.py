"""Weights in and out (pgnm_fast.weights): every input form, the summed stem's training steps,
the timm export, and the refusals."""
import argparse
import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from pgnm_fast.cli import main
from pgnm_fast.config import make_config
from pgnm_fast.errors import CheckpointError
from pgnm_fast.models import PolicyNet, convert_to_grey, create_model
from pgnm_fast.optim import build_optimizer, param_groups
from pgnm_fast.run_state import load_checkpoint, save_checkpoint
from pgnm_fast.synth import make_synthetic
from pgnm_fast.weights import fit_classifier, guess_model, read_weights

SMALL = ["--epochs", "1", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "4", "--seed", "3",
         "--loader", "torch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), images=240, seed=11, size=40)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _random_model(name="resnet10t", num_classes=13, in_chans=1, seed=0, dtype=torch.float32):
    """A classifier with random weights and BN statistics (so the logits test every tensor)."""
    g = torch.Generator().manual_seed(seed)
    model = create_model(name, num_classes, in_chans=in_chans).to(dtype)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g, dtype=dtype) * 0.5 + 0.5 if "running_var" in k
                        else torch.randn(v.shape, generator=g, dtype=dtype) * 0.1)
    return model.eval()


def _pgnm_checkpoint(path, model, name="resnet10t", classes=None, channels=1):
    classes = classes or [f"c{i}" for i in range(model.fc.out_features)]
    cfg = make_config("finetune", channels=channels, model=name)
    save_checkpoint({"stage": "finetune", "epoch": 0, "step": 1, "model_name": name,
                     "num_classes": len(classes), "in_chans": channels, "classes": classes,
                     "model": model.state_dict(), "config": vars(cfg) | {}, "data": ""}, path)
    return path


# -- the summed stem trains as the 3-channel one --------------------------------------------------

def _summed(state):
    """The 1-channel form, summed in the state's own dtype (convert_to_grey sums in float32)."""
    return dict(state, **{"conv1.0.weight": state["conv1.0.weight"].sum(1, keepdim=True)})


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_summed_stem_steps_match_the_three_channel_steps(opt):
    """Three steps (momentum / Adam moments in play, weight decay on) of a 3-channel model on a
    grey image replicated, and of its summed 1-channel form with the stem at lr x3, wd /3: the
    summed 3-channel weights equal the 1-channel weights after every step. Without the scaling
    the stems part (the control), so the comparison can fail. Adam's eps is raised for the
    comparison only: with the default 1e-8 its update sign(g) of a gradient element that is
    float64 rounding noise would differ between two exactly equal models (the scaling is exact
    for any eps, the gradients are not scaled)."""
    torch.manual_seed(0)
    cfg = make_config("finetune", opt=opt, momentum=0.9, weight_decay=0.05)
    rgb = _random_model(in_chans=3, dtype=torch.float64).train()
    x = torch.randn(4, 1, 24, 24, dtype=torch.float64)
    y = torch.randint(0, 13, (4,))

    def run(scale):
        grey = create_model("resnet10t", 13, in_chans=1).to(torch.float64).train()
        grey.load_state_dict(_summed(rgb.state_dict()))
        return grey, _opt(grey, scale)

    def _opt(model, scale):
        o = build_optimizer(param_groups(model, scale, cfg.weight_decay), cfg, 0.05, torch.device("cpu"))
        for group in o.param_groups:
            group.update(eps=1e-3) if "eps" in group else None
        return o

    three = _random_model(in_chans=3, dtype=torch.float64).train()
    three.load_state_dict(rgb.state_dict())
    opt3 = _opt(three, 1.0)
    (one, opt1), (plain, opt_plain) = run(3.0), run(1.0)
    for _ in range(3):
        for model, o, inp in ((three, opt3, x.repeat(1, 3, 1, 1)), (one, opt1, x), (plain, opt_plain, x)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(inp), y).backward()
            o.step()
        summed = _summed(three.state_dict())
        for k, v in one.state_dict().items():
            torch.testing.assert_close(v, summed[k], rtol=1e-7, atol=1e-9)
    gap = (plain.state_dict()["conv1.0.weight"] - summed["conv1.0.weight"]).abs().max()
    assert gap > 1e-4  # the unscaled stem does not follow the 3-channel one


# -- round trips ----------------------------------------------------------------------------------

def test_export_then_initial_checkpoint_gives_identical_logits(tmp_path):
    model = _random_model()
    ckpt = _pgnm_checkpoint(tmp_path / "best.pt", model)
    r = cli("export", ckpt, "--out", tmp_path / "timm")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 13
    assert config["model_args"]["in_chans"] == 1 and config["label_names"][0] == "c0"
    assert config["pretrained_cfg"]["input_size"][0] == 1 and len(config["pretrained_cfg"]["mean"]) == 1
    w = read_weights(tmp_path / "timm")
    assert (w.kind, w.model_name, w.classes) == ("timm folder", "resnet10t", [f"c{i}" for i in range(13)])
    again = create_model("resnet10t", 13)
    fit_classifier(again, w, "resnet10t", w.classes, print)
    x = torch.randn(4, 1, 40, 40)
    assert torch.equal(model(x), again.eval()(x))


def test_export_three_channel_stem_for_rgb_pipelines(tmp_path):
    model = _random_model(dtype=torch.float64)
    ckpt = _pgnm_checkpoint(tmp_path / "best.pt", model.float())
    assert cli("export", ckpt, "--out", tmp_path / "rgb", "--in-chans", "3").exit_code == 0
    w = read_weights(tmp_path / "rgb")
    assert w.in_chans == 3
    rgb = create_model("resnet10t", 13, in_chans=3)
    rgb.load_state_dict(w.model)
    x = torch.randn(4, 1, 40, 40)
    torch.testing.assert_close(rgb.eval()(x.repeat(1, 3, 1, 1)), model.float()(x), rtol=1e-4,
                               atol=1e-5)


def test_torchscript_export(tmp_path):
    model = _random_model()
    ckpt = _pgnm_checkpoint(tmp_path / "best.pt", model)
    assert cli("export", ckpt, "--out", tmp_path / "ts", "--format", "torchscript").exit_code == 0
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    x = torch.randn(2, 1, 40, 40)
    torch.testing.assert_close(scripted(x), model(x))


def test_export_loads_through_timm_itself(tmp_path):
    try:
        import timm
    except Exception as e:  # not installed, or its torchvision does not match this torch
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e)[:80]})")
    model = _random_model("resnet18", 5)
    ckpt = _pgnm_checkpoint(tmp_path / "best.pt", model, "resnet18")
    assert cli("export", ckpt, "--out", tmp_path / "timm").exit_code == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert loaded.num_classes == 5
    x = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_key_state_dict_loads_and_finetunes(data, tmp_path, suffix):
    """A 3-channel, 1000-class state dict with timm's key names (random weights), as a user
    downloads one: the head is replaced, the stem summed and trained at lr x3."""
    state = create_model("resnet10t", 1000, in_chans=3).state_dict()
    path = tmp_path / f"resnet10t{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    w = read_weights(path)
    assert (w.model_name, w.in_chans, w.num_classes) == ("resnet10t", 3, 1000)
    r = cli("finetune", "--initial-checkpoint", path, "--data", data, "--out", tmp_path / "ft",
            *SMALL)
    assert r.exit_code == 0, r.output
    assert "new classifier head" in r.output and "summed to 1 channel" in r.output
    out = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert out["config"]["stem_lr_scale"] == 3.0 and out["model"]["conv1.0.weight"].shape[1] == 1
    summed = convert_to_grey(state, "resnet10t")
    assert not torch.equal(out["model"]["conv1.0.weight"], summed["conv1.0.weight"])  # trained


def _authors_checkpoint(path, grid=8):
    """Their train.py's dict: DDP-prefixed keys, 3-channel stems, policy and bases, args."""
    model = create_model("resnet10t", 13, in_chans=3)
    policy = PolicyNet(grid=grid, in_chans=3)
    policy_state = {k: v for k, v in policy.state_dict().items() if not k.startswith("base_")}
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                "policy_net": {f"module.{k}": v for k, v in policy_state.items()},
                "base_alpha": torch.full((1, grid * grid), 0.25),
                "base_beta": torch.full((1, grid * grid), 0.75),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 89,
                "args": argparse.Namespace(model="resnet10t", grid=grid, lr=0.1)}, path)
    return model


@pytest.mark.slow
def test_authors_checkpoint_loads_for_finetune_heated_and_eval(data, tmp_path):
    path = tmp_path / "checkpoint.pth"
    model = _authors_checkpoint(path)
    w = read_weights(path)
    assert (w.kind, w.model_name, w.in_chans) == ("authors'", "resnet10t", 3)
    assert torch.equal(w.policy["base_beta"], torch.full((1, 64), 0.75))
    r = cli("finetune", "--from", path, "--data", data, "--out", tmp_path / "ft", *SMALL)
    assert r.exit_code == 0, r.output
    r = cli("train", "--initial-checkpoint", path, "--data", data, "--out", tmp_path / "heated",
            "--grid", "8", "--impl", "reference", *SMALL)
    assert r.exit_code == 0, r.output
    assert "policy and its base buffers loaded" in r.output
    r = cli("eval", "--checkpoint", path, "--data", data, "-j", "0", "--json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] > 0
    grey = create_model("resnet10t", 13)
    grey.load_state_dict(convert_to_grey(model.state_dict(), "resnet10t"))
    w_grey = create_model("resnet10t", 13)
    fit_classifier(w_grey, w, "resnet10t", [str(i) for i in range(13)], print, training=False)
    x = torch.randn(2, 1, 40, 40)
    assert torch.equal(grey.eval()(x), w_grey.eval()(x))


# -- refusals -------------------------------------------------------------------------------------

def test_another_architecture_names_the_keys_and_the_model_it_looks_like(data, tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(create_model("resnet18", 13).state_dict(), str(path))
    assert guess_model(read_weights(path).model) == "resnet18"
    r = cli("finetune", "--from", path, "--model", "resnet50", "--data", data, "--out",
            tmp_path / "ft", *SMALL)
    assert r.exit_code != 0
    line = r.output.strip()
    assert line.startswith("Error:") and "\n" not in line
    assert "do not fit resnet50" in line and "layer1.0.conv3.weight" in line
    assert "look like resnet18" in line


def test_a_file_that_is_not_a_checkpoint_says_so_in_one_line(data, tmp_path):
    for name, content in (("notes.pth", b"just some text\n"), ("w.safetensors", b"\x00" * 64)):
        path = tmp_path / name
        path.write_bytes(content)
        r = cli("eval", "--checkpoint", path, "--data", data)
        line = r.output.strip()
        assert r.exit_code != 0 and line.startswith("Error:") and "\n" not in line, r.output
        assert str(path) in line and "not a" in line


class Custom:
    def __init__(self):
        self.weights = torch.zeros(2)


def test_a_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Custom()}, f)
    torch.save({"model": Custom()}, path)
    with pytest.raises(CheckpointError, match="needs code to unpickle.*refused"):
        read_weights(path)
