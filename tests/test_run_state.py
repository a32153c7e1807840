"""A run folder written before the run state had its own record (a checkpoint dict with the keys
written by hand here, exactly as earlier versions wrote them) still resumes and evaluates."""
import dataclasses
import json

import torch
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.config import make_config
from pgnm_fast.models import create_model
from pgnm_fast.pipelines.sources import open_source
from pgnm_fast.run_state import RunState, load_run_state
from pgnm_fast.synth import make_synthetic


def _old_layout_checkpoint(data, path, epochs=2):
    """The dict earlier versions saved after epoch 0 of a baseline run, key by key."""
    cfg = make_config("baseline", "tiny", epochs=epochs, batch_size=16, train_crop_size=32,
                      val_resize_size=36, val_crop_size=32, workers=0, print_freq=4, seed=3,
                      loader="torch")
    classes = list(open_source(data).classes)
    torch.manual_seed(0)
    model = create_model(cfg.model, len(classes), in_chans=cfg.channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    state = {
        "stage": "baseline", "epoch": 0, "step": 5, "model_name": cfg.model,
        "num_classes": len(classes), "in_chans": cfg.channels, "classes": classes,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(cfg), "data": str(data), "best_f1": 0.1,
        "val_metrics": {"top1": 0.1}, "rng": torch.get_rng_state(), "format": "pgnm-fast/1",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_old_checkpoint_reads_as_a_run_state_and_writes_back_the_same_keys(tmp_path):
    data = make_synthetic(tmp_path / "synth", images=130, seed=5, size=40)
    old = _old_layout_checkpoint(data, tmp_path / "run" / "last.pt")
    state = load_run_state(tmp_path / "run" / "last.pt")
    assert isinstance(state, RunState) and state.epoch == 0 and state.step == 5
    assert state.classes == old["classes"] and not state.is_finished
    assert set(state.to_dict()) == set(old) - {"format"}
    state.epoch = 1
    assert state.is_finished


def test_old_run_folder_resumes_and_evaluates(tmp_path):
    data = make_synthetic(tmp_path / "synth", images=130, seed=5, size=40)
    run = tmp_path / "run"
    _old_layout_checkpoint(data, run / "last.pt")
    r = CliRunner().invoke(main, ["train", "--no-policy", "--resume", str(run / "last.pt"),
                                  "--data", str(data)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "resumed from epoch 0 (step 5)" in r.output
    last = load_run_state(run / "last.pt")
    assert last.epoch == 1 and last.step > 5 and last.is_finished
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(run / "last.pt"), "--split", "val",
                                  "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert 0.0 <= json.loads(out.read_text())["top1"] <= 1.0


def test_capture_restore_and_average_go_through_the_run_state(tmp_path):
    """The state a stage captures restores its modules, optimisers and random state, and the
    average's record keeps the metadata with the averaged weights only."""
    from pgnm_fast.kernels import make_masker
    from pgnm_fast.models import PolicyNet
    from pgnm_fast.run_state import save_run_state
    cfg = make_config("heated", "tiny", grid=8, train_crop_size=32)
    torch.manual_seed(0)
    model, policy = create_model(cfg.model, 3), PolicyNet(grid=8, trunk=cfg.policy_model)
    masker = make_masker(cfg.impl, 8, 32, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    popt = torch.optim.SGD(policy.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    state = RunState.capture(cfg, ["a", "b", "c"], tmp_path, epoch=1, step=7, best_f1=0.5,
                             val_metrics={"f1_macro": float("nan")}, model=model, optimizer=opt,
                             policy=policy, masker=masker, policy_optimizer=popt)
    assert state.val_metrics == {"f1_macro": None} and state.train_config == cfg
    save_run_state(state, tmp_path / "last.pt")
    back = load_run_state(tmp_path / "last.pt")
    assert back.source == tmp_path / "last.pt" and "source" not in back.to_dict()
    expected = torch.rand(3)
    torch.manual_seed(1)
    model2, policy2 = create_model(cfg.model, 3), PolicyNet(grid=8, trunk=cfg.policy_model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    popt2 = torch.optim.SGD(policy2.parameters(), lr=0.01, momentum=0.9)
    back.restore(model2, opt2, policy2, make_masker(cfg.impl, 8, 32, seed=2), popt2, impl=cfg.impl)
    assert torch.equal(torch.rand(3), expected)  # the random state captured with the epoch
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 model2.state_dict().values()))
    assert len(opt2.state) == len(opt.state) > 0
    avg = back.average({k: v * 0 for k, v in back.model.items()}, [0, 1], {"top1": 0.25})
    assert avg.optimizer is None and avg.rng is None and avg.averaged_epochs == [0, 1]
    assert avg.val_metrics == {"top1": 0.25} and avg.epoch == back.epoch and back.optimizer
