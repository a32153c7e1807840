"""The policy's stem summed from an authors' 3-channel checkpoint trains as the 3-channel stem
would (lr x3, weight decay /3, as the classifier's: pgnm_fast.weights), and the scales stay with
the run: in its checkpoint, on --resume and through ``finetune --from``. The groups are built in
pgnm_fast.optim."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.models import PolicyNet, create_model
from pgnm_fast.optim import STEM_LR_SCALE, policy_param_groups, stem_lr_scales
from pgnm_fast.run_state import RunState, load_checkpoint
from pgnm_fast.weights import Weights

STEM = "fe.conv1.0.weight"


def _policy(in_chans, state=None):
    policy = PolicyNet(grid=4, in_chans=in_chans).double().train()
    if state is not None:
        policy.load_state_dict(state)
    return policy


def _summed(state):
    """The 1-channel form, summed in the state's own dtype (convert_to_grey sums in float32)."""
    return dict(state, **{STEM: state[STEM].sum(1, keepdim=True)})


def _sgd(policy, scale):
    return torch.optim.SGD(policy_param_groups(policy, scale, 0.05, 0.05), lr=0.05, momentum=0.9,
                           weight_decay=0.05)


def test_summed_policy_stem_steps_match_the_three_channel_steps():
    """Three SGD steps (momentum, weight decay) of an RGB policy on a grey image replicated and
    of its summed 1-channel form with the stem group: the summed 3-channel weights equal the
    1-channel ones after every step (float64, 1e-12). Without the group the stems part (the
    control, about 0.14 here)."""
    torch.manual_seed(0)
    rgb = _policy(3)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    three, one, plain = _policy(3, rgb.state_dict()), *(
        _policy(1, _summed(rgb.state_dict())) for _ in range(2))
    runs = [(three, _sgd(three, 1.0), x.repeat(1, 3, 1, 1)), (one, _sgd(one, STEM_LR_SCALE), x),
            (plain, _sgd(plain, 1.0), x)]
    assert [len(o.param_groups) for _, o, _ in runs] == [1, 2, 1]
    # unscaled: one group in parameters() order, as the optimiser states saved before it load
    assert all(a is b for a, b in zip(runs[2][1].param_groups[0]["params"], plain.parameters()))
    for _ in range(3):
        for policy, opt, inp in runs:
            opt.zero_grad()
            out = policy(inp)
            (out.a_tilde.sin().mean() + (out.b_tilde ** 2).mean() * 3).backward()
            opt.step()
        summed = _summed(three.state_dict())
        for k, v in one.state_dict().items():
            torch.testing.assert_close(v, summed[k], rtol=0, atol=1e-12)
    assert (plain.state_dict()[STEM] - summed[STEM]).abs().max() > 1e-3


def _weights(kind, in_chans=3, policy_chans=None, config=None):
    policy = None if policy_chans is None else PolicyNet(grid=4, in_chans=policy_chans).state_dict()
    model = create_model("resnet10t", 5, in_chans=in_chans).state_dict()
    state = None if config is None else RunState("heated", 0, "resnet10t", list("abcde"), model,
                                                 config)
    return Weights(Path("w.pt"), kind, model, "resnet10t", policy=policy, state=state)


def test_stem_scales_of_each_starting_point():
    both = dict(stem_lr_scale=STEM_LR_SCALE, policy_stem_lr_scale=STEM_LR_SCALE)
    assert stem_lr_scales(_weights("authors'", 3, 3), 1) == both
    assert stem_lr_scales(_weights("authors'", 3, 3), 3) == {}  # --in-chans 3: nothing summed
    assert stem_lr_scales(_weights("state dict", 3), 1) == {"stem_lr_scale": STEM_LR_SCALE}
    assert stem_lr_scales(_weights("pgnm-fast", 1, 1, both), 1) == both  # summed by its run
    assert stem_lr_scales(_weights("pgnm-fast", 1, 1, {"stem_lr_scale": 1.0}), 1) == {
        "stem_lr_scale": 1.0}


SMALL = ["--epochs", "1", "-b", "16", "--train-crop-size", "32", "--val-resize-size", "36",
         "--val-crop-size", "32", "-j", "0", "--print-freq", "4", "--seed", "3",
         "--loader", "torch"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_the_stem_scales_stay_with_the_run(small_data, tmp_path):
    """heated from an authors' checkpoint: both stems in their groups, kept in the checkpoint
    and on --resume; ``finetune --from`` that run keeps the classifier's x3."""
    path = tmp_path / "checkpoint.pth"
    policy = PolicyNet(grid=8, in_chans=3).state_dict()
    torch.save({"model": create_model("resnet10t", 13, in_chans=3).state_dict(),
                "policy_net": {k: v for k, v in policy.items() if not k.startswith("base_")},
                "base_alpha": torch.rand(1, 64), "base_beta": torch.rand(1, 64),
                "args": argparse.Namespace(model="resnet10t", grid=8)}, path)
    r = cli("train", "--initial-checkpoint", path, "--data", small_data, "--out",
            tmp_path / "heated", "--grid", "8", "--impl", "reference", *SMALL)
    assert r.exit_code == 0, r.output
    saved = load_checkpoint(tmp_path / "heated" / "last.pt")
    assert saved["config"]["stem_lr_scale"] == saved["config"]["policy_stem_lr_scale"] == 3.0
    groups = saved["policy_optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0]
    assert groups[1]["lr"] == pytest.approx(3 * groups[0]["lr"])
    r = cli("train", "--resume", tmp_path / "heated" / "last.pt", "--epochs", "2", "-j", "0",
            "--loader", "torch")
    assert r.exit_code == 0, r.output
    r = cli("finetune", "--from", tmp_path / "heated" / "last.pt", "--data", small_data,
            "--out", tmp_path / "ft", *SMALL)
    assert r.exit_code == 0, r.output
    ft = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert ft["config"]["stem_lr_scale"] == 3.0
    assert [g["lr_scale"] for g in ft["optimizer"]["param_groups"]] == [1.0, 3.0]
