"""The training options with timm's / torchvision's names: --class-balanced, --mean/--std,
--clip-grad-norm, --label-smoothing, --opt."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgnm_fast.config import make_config
from pgnm_fast.engine import PlainStep, clip_gradients
from pgnm_fast.errors import ConfigError
from pgnm_fast.pipelines import MEAN, STD, make_loader
from pgnm_fast.pipelines.samplers import ClassBalancedSampler, EpochSampler

LABELS = np.array([0] * 90 + [1] * 10)  # 9:1 imbalance


def _draws(sampler, epochs):
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(np.fromiter(iter(sampler), dtype=np.int64))
    return out


def test_class_balanced_sampler_balances_the_classes():
    """2000 draws: the minority class is drawn with frequency 1/2 (sd 0.011; the bound 0.05 is
    4.5 sd, so a balanced sampler fails it with probability < 1e-5), against 1/10 shuffled."""
    balanced = np.concatenate(_draws(ClassBalancedSampler(LABELS, seed=4), 20))
    shuffled = np.concatenate(_draws(EpochSampler(range(len(LABELS)), seed=4), 20))
    assert len(balanced) == len(shuffled) == 2000
    assert abs(LABELS[balanced].mean() - 0.5) < 0.05
    assert abs(LABELS[shuffled].mean() - 0.1) < 1e-12


def test_class_balanced_sampler_is_deterministic_and_shards_across_ranks():
    one = _draws(ClassBalancedSampler(LABELS, seed=7), 3)
    again = _draws(ClassBalancedSampler(LABELS, seed=7), 3)
    other_seed = _draws(ClassBalancedSampler(LABELS, seed=8), 1)
    assert all(np.array_equal(a, b) for a, b in zip(one, again))
    assert not np.array_equal(one[0], other_seed[0]) and not np.array_equal(one[0], one[1])
    ranks = [_draws(ClassBalancedSampler(LABELS, num_replicas=3, rank=r, seed=7), 1)[0]
             for r in range(3)]
    assert [len(r) for r in ranks] == [34, 34, 34]  # ceil(100 / 3), as DistributedSampler
    total = 102
    g = torch.Generator().manual_seed(7 * 1_000_003)
    weights = 1.0 / torch.bincount(torch.as_tensor(LABELS)).double()[torch.as_tensor(LABELS)]
    whole = torch.multinomial(weights, total, replacement=True, generator=g).numpy()
    assert np.array_equal(np.stack(ranks, 1).reshape(-1), whole)  # rank r: every 3rd from r


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_mean_std_reach_the_loader(synth_root, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    kw = dict(train=False, batch_size=8, crop_size=32, resize_size=36, workers=0, backend=backend,
              split="val")
    default = next(iter(make_loader(synth_root, **kw)))[0]
    mine = next(iter(make_loader(synth_root, **kw, mean=0.5, std=0.25)))[0]
    torch.testing.assert_close(mine, (default * STD + MEAN - 0.5) / 0.25, rtol=1e-4, atol=1e-4)


def test_mean_std_reach_the_packed_cache_loader(synth_root, tmp_path):
    from pgnm_fast.pipelines.pack import pack
    cache = tmp_path / "cache"
    pack(synth_root, cache, log=lambda *_: None, workers=0)
    kw = dict(train=False, batch_size=8, crop_size=32, resize_size=36, workers=0,
              backend="torch", split="val")
    default = next(iter(make_loader(cache, **kw)))[0]
    mine = next(iter(make_loader(cache, **kw, mean=0.2, std=2.0)))[0]
    torch.testing.assert_close(mine, (default * STD + MEAN - 0.2) / 2.0, rtol=1e-4, atol=1e-4)


def test_clip_gradients_caps_the_total_norm_on_the_device():
    model = torch.nn.Linear(8, 4)
    F.mse_loss(model(torch.randn(16, 8) * 100), torch.zeros(16, 4)).backward()
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert before.norm() > 1.0
    clip_gradients(model, 1.0)
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(after.norm(), torch.tensor(1.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(after, before / before.norm(), rtol=1e-4, atol=1e-7)  # direction kept


def test_plain_step_applies_label_smoothing_and_clipping():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model, ref = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = torch.zeros(5)
    PlainStep(model, opt, False, torch.device("cpu"), label_smoothing=0.2, clip_grad_norm=0.01)(
        x, y, stats)
    F.cross_entropy(ref(x), y, label_smoothing=0.2).backward()
    grads = [p.grad for p in ref.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    for p, g, q in zip(ref.parameters(), grads, model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach() - 0.5 * g * 0.01 / (norm + 1e-6))
    torch.testing.assert_close(stats[1] / stats[4],
                               F.cross_entropy(ref(x), y, label_smoothing=0.2).detach())


def test_bad_option_values_name_the_flag():
    for bad, flag in ((dict(opt="lamb"), "--opt"), (dict(label_smoothing=1.0), "--label-smoothing"),
                      (dict(clip_grad_norm=-1.0), "--clip-grad-norm"), (dict(std=0.0), "--std")):
        with pytest.raises(ConfigError, match=flag):
            make_config("finetune", **bad)


SMALL = ["-b", "16", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size",
         "32", "-j", "0", "--print-freq", "4", "--seed", "3", "--loader", "torch"]


@pytest.mark.slow
def test_options_through_the_cli_and_a_resumed_summed_stem(synth_root, tmp_path):
    """A baseline with every option, then a fine-tune from a 3-channel state dict resumed: the
    stem's group keeps lr x3 and weight decay /3 after the resume resets the learning rates."""
    from click.testing import CliRunner

    from pgnm_fast.cli import main
    from pgnm_fast.models import create_model
    from pgnm_fast.run_state import load_checkpoint

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    r = cli("train", "--no-policy", "--data", synth_root, "--out", tmp_path / "base", *SMALL,
            "--epochs", "1", "--opt", "adamw", "--lr", "0.001", "--label-smoothing", "0.1",
            "--clip-grad-norm", "1", "--class-balanced", "--mean", "0.4", "--std", "0.3")
    assert r.exit_code == 0, r.output
    cfg = load_checkpoint(tmp_path / "base" / "last.pt")["config"]
    assert (cfg["opt"], cfg["label_smoothing"], cfg["clip_grad_norm"], cfg["class_balanced"],
            cfg["mean"], cfg["std"]) == ("adamw", 0.1, 1.0, True, 0.4, 0.3)

    path = tmp_path / "rgb.pth"
    torch.save(create_model("resnet10t", 13, in_chans=3).state_dict(), path)
    ft = tmp_path / "ft"
    assert cli("finetune", "--from", path, "--data", synth_root, "--out", ft, *SMALL,
               "--epochs", "1", "--lr", "0.02", "--wd", "3e-4").exit_code == 0
    r = cli("finetune", "--from", path, "--resume", ft / "last.pt", *SMALL, "--epochs", "2")
    assert r.exit_code == 0, r.output
    groups = load_checkpoint(ft / "last.pt")["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups][1] == 1
    assert groups[1]["lr"] == pytest.approx(3 * groups[0]["lr"])
    assert groups[1]["weight_decay"] == pytest.approx(groups[0]["weight_decay"] / 3)
    assert groups[0]["weight_decay"] == pytest.approx(3e-4)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_every_backend_trains_in_class_balanced_order(synth_root, backend):
    """Both backends take the train order from the same sampler, so --class-balanced gives the
    same image order through DALI and the plain loader."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    loader = make_loader(synth_root, train=True, batch_size=8, crop_size=32, resize_size=36,
                         workers=0, backend=backend, seed=5, class_balanced=True)
    assert isinstance(loader.sampler, ClassBalancedSampler)
    from pgnm_fast.pipelines import open_source
    labels = open_source(synth_root).split("train").labels
    ref = ClassBalancedSampler(labels, seed=5)
    loader.sampler.set_epoch(2)
    ref.set_epoch(2)
    # the plain loader's train sampler yields (index, augmentation seed) pairs, DALI's indices
    order = [k[0] if isinstance(k, tuple) else k for k in loader.sampler]
    assert np.array_equal(np.asarray(order, dtype=np.int64), np.fromiter(iter(ref), dtype=np.int64))
