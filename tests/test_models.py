"""Networks of docs/method.md §2 and the policy of docs/method.md §3.

Reference numbers: timm publishes parameter counts rounded to 0.01 M (results/benchmark-*.csv in
huggingface/pytorch-image-models: resnet10t 5.44, resnet18 11.69, resnet50 25.56); the exact counts
below are torchvision's `num_params` metadata for resnet18 / resnet50 (same architecture and keys
as timm's, which loads torchvision weights as `resnet18.tv_in1k`), and for resnet10t the sum over
its layers as timm's resnet.py defines them (stem 24-32-64, BasicBlock [1,1,1,1], avg-down).
"""
import math

import pytest
import torch
import torch.nn as nn

from pgnm_fast.errors import CheckpointError, ConfigError
from pgnm_fast.models import (
    PolicyNet,
    adapt_input_conv,
    convert_to_grey,
    create_model,
    model_names,
    policy_state_from_authors,
)

NAMES = ['resnet10t', 'resnet18', 'resnet50']
TIMM_PARAMS = {'resnet10t': 5_435_488, 'resnet18': 11_689_512, 'resnet50': 25_557_032}
# state-dict entries: timm's / torchvision's resnet18 has 122, resnet50 320; resnet10t: 14 convs,
# 14 BNs (5 entries each) and fc (2) = 14 + 70 + 2 = 86.
TIMM_KEYS = {'resnet10t': 86, 'resnet18': 122, 'resnet50': 320}
# (key, shape) pairs as they appear in timm checkpoints of each model (in_chans=3, 1000 classes).
KNOWN_KEYS = {
    'resnet10t': [('conv1.0.weight', (24, 3, 3, 3)), ('conv1.1.running_var', (24,)),
                  ('conv1.3.weight', (32, 24, 3, 3)), ('conv1.4.bias', (32,)),
                  ('conv1.6.weight', (64, 32, 3, 3)), ('bn1.weight', (64,)),
                  ('layer1.0.conv2.weight', (64, 64, 3, 3)),
                  ('layer2.0.downsample.1.weight', (128, 64, 1, 1)),
                  ('layer2.0.downsample.2.running_mean', (128,)),
                  ('layer4.0.bn2.num_batches_tracked', ()), ('fc.weight', (1000, 512))],
    'resnet18': [('conv1.weight', (64, 3, 7, 7)), ('bn1.bias', (64,)),
                 ('layer1.1.conv2.weight', (64, 64, 3, 3)),
                 ('layer2.0.downsample.0.weight', (128, 64, 1, 1)),
                 ('layer3.0.downsample.1.running_var', (256,)), ('fc.bias', (1000,))],
    'resnet50': [('conv1.weight', (64, 3, 7, 7)), ('layer1.0.conv1.weight', (64, 64, 1, 1)),
                 ('layer1.0.downsample.0.weight', (256, 64, 1, 1)),
                 ('layer3.5.bn3.weight', (1024,)), ('layer4.2.conv3.weight', (2048, 512, 1, 1)),
                 ('fc.weight', (1000, 2048))],
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine and running statistics, so eval-mode tests exercise every layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert scale > 1e-3, 'degenerate output: the comparison would prove nothing'
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ---------------------------------------------------------------- classifiers

@pytest.mark.parametrize('name', NAMES)
def test_parameter_count_and_keys_match_timm(name):
    model = create_model(name, num_classes=1000, in_chans=3)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]
    sd = model.state_dict()
    assert len(sd) == TIMM_KEYS[name]
    for key, shape in KNOWN_KEYS[name]:
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


def test_model_names_and_unknown_name():
    assert model_names() == NAMES
    with pytest.raises(ConfigError) as err:
        create_model('resnet34', num_classes=10)
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize('name,stem', [('resnet10t', 'conv1.0.weight'), ('resnet50', 'conv1.weight')])
def test_default_is_one_channel_and_head_api(name, stem):
    gen = torch.Generator().manual_seed(1)
    model = create_model(name, num_classes=7).eval()
    assert model.state_dict()[stem].shape[1] == 1
    x = torch.randn(2, 1, 64, 64, generator=gen)
    logits = model(x)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 7) and pre.shape == (2, model.num_features)
    _close(model.fc(pre), logits)
    assert isinstance(model.global_pool, nn.Module)
    trunk = create_model(name, num_classes=0)
    assert isinstance(trunk.fc, nn.Identity) and not any(k.startswith('fc.') for k in trunk.state_dict())
    assert trunk(x).shape == (2, trunk.num_features)


def test_init_follows_timm():
    """Conv kaiming-normal fan_out (not fan_in), last BN of each residual branch zero, fc default."""
    torch.manual_seed(2)
    model = create_model('resnet18', num_classes=1000, in_chans=3)
    w = model.layer4[0].conv1.weight  # 256 -> 512, 3x3: fan_in 2304, fan_out 4608
    want = math.sqrt(2.0 / (512 * 9))  # fan_in would give 0.0295
    n = w.numel()  # 1.18 M samples: std's relative standard error 6.5e-4, mean's SE 1.9e-5
    assert abs(w.std().item() / want - 1) < 0.01
    assert abs(w.mean().item()) < 5 * want / math.sqrt(n)
    for block in [*model.layer1, *model.layer2, *model.layer3, *model.layer4]:
        assert torch.all(block.bn2.weight == 0) and torch.all(block.bn1.weight == 1)
    bound = 1 / math.sqrt(512)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert model.fc.weight.abs().max().item() <= bound
    assert abs(model.fc.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
    r50 = create_model('resnet50', num_classes=10)
    assert all(torch.all(b.bn3.weight == 0) for b in r50.layer3)


@pytest.mark.parametrize('name', NAMES)
def test_grey_conversion_gives_identical_logits(name):
    gen = torch.Generator().manual_seed(3)
    rgb = create_model(name, num_classes=10, in_chans=3)
    _randomise_bn(rgb, gen)
    rgb.eval()
    grey = create_model(name, num_classes=10, in_chans=1).eval()
    grey.load_state_dict(convert_to_grey(rgb.state_dict(), name), strict=True)
    x = torch.randn(2, 1, 64, 64, generator=gen)
    with torch.no_grad():
        want = rgb(x.expand(-1, 3, -1, -1))
        _close(grey(x), want)
        # control: averaging instead of summing must be visibly wrong, or the test proves nothing
        stem = grey.conv1[0] if name == 'resnet10t' else grey.conv1
        stem.weight /= 3
        assert (grey(x) - want).abs().max() > 1e-2 * want.abs().max()


@pytest.mark.parametrize('name', ['resnet10t', 'resnet50'])
def test_channels_last_input(name):
    gen = torch.Generator().manual_seed(4)
    model = create_model(name, num_classes=5, in_chans=1)
    _randomise_bn(model, gen)
    model.eval()
    x = torch.randn(2, 1, 72, 72, generator=gen)  # odd maps (9, 5): ceil-mode avg-down pools pad
    with torch.no_grad():
        _close(model(x.contiguous(memory_format=torch.channels_last)), model(x))
        model = model.to(memory_format=torch.channels_last)
        _close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_adapt_input_conv():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 3, 3, 3, generator=gen)
    one = adapt_input_conv(1, w)
    assert one.shape == (8, 1, 3, 3)
    torch.testing.assert_close(one[:, 0], w[:, 0] + w[:, 1] + w[:, 2], rtol=1e-6, atol=1e-6)
    assert adapt_input_conv(1, w.half()).dtype == torch.half
    assert adapt_input_conv(3, w) is w
    five = adapt_input_conv(5, w)  # timm's heuristic: repeat RGB, scale by 3/5
    torch.testing.assert_close(five[:, 3:], w[:, :2] * 0.6)
    with pytest.raises(ConfigError):
        adapt_input_conv(1, torch.randn(8, 4, 3, 3))


def test_convert_to_grey_errors_and_idempotence():
    sd = create_model('resnet18', num_classes=3, in_chans=3).state_dict()
    with pytest.raises(CheckpointError, match='conv1.0.weight'):
        convert_to_grey(sd, 'resnet10t')
    with pytest.raises(ConfigError, match='resnet10t, resnet18, resnet50'):
        convert_to_grey(sd, 'vgg16')
    grey = convert_to_grey(sd, 'resnet18')
    assert grey['conv1.weight'].shape[1] == 1 and sd['conv1.weight'].shape[1] == 3
    assert convert_to_grey(grey, 'resnet18')['conv1.weight'] is grey['conv1.weight']
    ddp = convert_to_grey({'module.' + k: v for k, v in sd.items()}, 'resnet18', prefix='module.')
    assert ddp['module.conv1.weight'].shape[1] == 1


# ---------------------------------------------------------------- policy

def test_policy_shapes_and_formula():
    gen = torch.Generator().manual_seed(6)
    policy = PolicyNet(grid=64, in_chans=1)
    assert policy.grid == 64
    assert policy.base_alpha.shape == (1, 4096) and policy.base_beta.shape == (1, 4096)
    assert not any('base' in n for n, _ in policy.named_parameters())
    for base in (policy.base_alpha, policy.base_beta):  # U(0,1): 4096 draws, mean SE 0.0045
        assert base.min() >= 0 and base.max() < 1 and abs(base.mean().item() - 0.5) < 0.03
    out = policy(torch.randn(3, 1, 64, 64, generator=gen))
    for t in out:
        assert t.shape == (3, 4096)
    _close(out.a_tilde, 0.9 * policy.base_alpha + 0.1 * out.h_a)
    _close(out.b_tilde, 0.9 * policy.base_beta + 0.1 * out.h_b)
    assert policy.alpha[0].in_features == 512 and policy.beta[6].out_features == 4096


def test_policy_heads_run_once_per_forward():
    policy = PolicyNet(grid=16).train()
    calls = {'alpha': 0, 'beta': 0}
    for name in calls:
        getattr(policy, name).register_forward_hook(
            lambda mod, inp, out, name=name: calls.__setitem__(name, calls[name] + 1))
    before = policy.alpha[1].num_batches_tracked.item()
    policy(torch.randn(2, 1, 64, 64))
    assert calls == {'alpha': 1, 'beta': 1}
    assert policy.alpha[1].num_batches_tracked.item() == before + 1  # BN statistics updated once


def test_update_base_is_the_ema():
    gen = torch.Generator().manual_seed(7)
    policy = PolicyNet(grid=16)
    old_a, old_b = policy.base_alpha.clone(), policy.base_beta.clone()
    ptr = policy.base_alpha.data_ptr()
    h_a = torch.randn(4, 256, generator=gen, requires_grad=True) * 3
    h_b = torch.randn(4, 256, generator=gen) * 3
    policy.update_base(h_a, h_b)
    torch.testing.assert_close(policy.base_alpha, 0.99 * old_a + 0.01 * h_a.detach().mean(0, keepdim=True),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(policy.base_beta, 0.99 * old_b + 0.01 * h_b.mean(0, keepdim=True),
                               rtol=1e-6, atol=1e-6)
    assert (policy.base_alpha - old_a).abs().max() > 1e-3  # it did move
    assert policy.base_alpha.data_ptr() == ptr  # in place: what a CUDA graph replays on
    assert not policy.base_alpha.requires_grad and policy.base_alpha.grad_fn is None
    policy.update_base(h_a.detach().bfloat16(), h_b.bfloat16())  # autocast outputs
    assert policy.base_alpha.dtype == torch.float32


def test_update_base_traces_without_graph_breaks():
    """fullgraph tracing fails on .item()/.tolist(): a proxy for 'no host sync' on CPU."""
    policy = PolicyNet(grid=8)
    old = policy.base_beta.clone()
    h = torch.randn(2, 64)
    torch.compile(policy.update_base, backend='eager', fullgraph=True)(h, h)
    torch.testing.assert_close(policy.base_beta, 0.99 * old + 0.01 * h.mean(0, keepdim=True),
                               rtol=1e-6, atol=1e-6)


def test_no_gradient_reaches_the_bases():
    gen = torch.Generator().manual_seed(8)
    policy = PolicyNet(grid=16).train()
    out = policy(torch.randn(2, 1, 64, 64, generator=gen))
    w_a = torch.randn(2, 256, generator=gen)
    w_b = torch.randn(2, 256, generator=gen)
    ((out.a_tilde * w_a).sum() + (out.b_tilde * w_b).sum()).backward()
    assert policy.base_alpha.grad is None and policy.base_beta.grad is None
    # d/d(last bias) of sum(w * (0.9 base + 0.1 h)) = 0.1 * sum_b w
    torch.testing.assert_close(policy.alpha[6].bias.grad, 0.1 * w_a.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy.beta[6].bias.grad, 0.1 * w_b.sum(0), rtol=1e-5, atol=1e-6)
    assert policy.fe.conv1[0].weight.grad.abs().sum() > 0


def test_unconditional():
    policy = PolicyNet(grid=16)
    a, b = policy.unconditional(5)
    assert a.shape == (5, 256) and b.shape == (5, 256)
    assert torch.equal(a[3], policy.base_alpha[0]) and torch.equal(b[4], policy.base_beta[0])


def test_policy_grey_conversion_gives_identical_outputs():
    gen = torch.Generator().manual_seed(9)
    rgb = PolicyNet(grid=16, in_chans=3)
    _randomise_bn(rgb, gen)
    rgb.eval()
    grey = PolicyNet(grid=16, in_chans=1).eval()
    grey.load_state_dict(convert_to_grey(rgb.state_dict(), 'policy'), strict=True)
    x = torch.randn(2, 1, 64, 64, generator=gen)
    with torch.no_grad():
        want = rgb(x.expand(-1, 3, -1, -1))
        got = grey(x.contiguous(memory_format=torch.channels_last))
    for g, w in zip(got, want):
        _close(g, w)


def test_authors_checkpoint_layout_loads():
    """The authors save {'policy_net': MaskGenerator.state_dict(), 'base_alpha': (1, G^2), ...}."""
    src = PolicyNet(grid=16, in_chans=3)
    sd = src.state_dict()
    ckpt = {'policy_net': {k: v for k, v in sd.items() if not k.startswith('base_')},
            'base_alpha': sd['base_alpha'].clone(), 'base_beta': sd['base_beta'].clone(), 'epoch': 3}
    dst = PolicyNet(grid=16, in_chans=3)
    dst.load_state_dict(policy_state_from_authors(ckpt), strict=True)
    assert torch.equal(dst.base_beta, src.base_beta)
    assert torch.equal(dst.alpha[3].weight, src.alpha[3].weight)
    with pytest.raises(CheckpointError, match='base_beta'):
        policy_state_from_authors({'policy_net': ckpt['policy_net'], 'base_alpha': sd['base_alpha']})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_policy_step_captures_in_a_cuda_graph():
    policy = PolicyNet(grid=64).cuda().train()
    x = torch.randn(4, 1, 64, 64, device='cuda')
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for _ in range(3):
            out = policy(x)
            policy.update_base(out.h_a, out.h_b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = policy(x)
        policy.update_base(out.h_a, out.h_b)
    before = policy.base_alpha.clone()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = 0.99 * before + 0.01 * out.h_a.mean(0, keepdim=True)
    torch.testing.assert_close(policy.base_alpha, want, rtol=1e-5, atol=1e-6)
