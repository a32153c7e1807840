"""ResNet-10t / 18 / 50, architecturally identical to timm's, with timm's state-dict key names.

timm is not a dependency; this file re-states the parts of timm's `timm/models/resnet.py` that the
three PGNM models use, so that timm checkpoints load with `load_state_dict(strict=True)`:

- resnet18 / resnet50: 7x7 stem `conv1`, `bn1`, `act1`, `maxpool`; BasicBlock / Bottleneck
  stages `layer1..layer4`; projection shortcut `downsample.0` (1x1 conv, strided) + `downsample.1`
  (BN); head `global_pool` + `fc`.
- resnet10t: the "deep tiered" stem `conv1.0` (3x3/2, 24 ch), `conv1.1` BN, `conv1.3` (3x3, 32 ch),
  `conv1.4` BN, `conv1.6` (3x3, 64 ch), then `bn1`; "avg-down" shortcuts: `downsample.0` is
  AvgPool2d(2, ceil_mode, count_include_pad=False), `downsample.1` the 1x1 conv, `downsample.2` BN.

Initialisation follows timm's `ResNet.init_weights`: every Conv2d kaiming-normal (fan_out, relu);
BatchNorm weight 1, bias 0; `fc` PyTorch's default Linear init; and, with `zero_init_last=True`
(timm's default), the last BN of every residual branch (`bn2` in BasicBlock, `bn3` in Bottleneck)
starts with weight 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgnm_fast.errors import ConfigError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x += shortcut
        return self.act2(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


def _downsample(inplanes: int, outplanes: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection shortcut; the Sequential indices are part of the state-dict names."""
    if not avg_down:  # timm's downsample_conv: strided 1x1 conv, BN
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(outplanes))
    # timm's downsample_avg: average-pool first, then an unstrided 1x1 conv, BN
    pool = (nn.Identity() if stride == 1
            else nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False))
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes))


class GlobalAvgPool(nn.Module):
    """Global average pool to (B, C); a mean over H, W works for any memory format."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=not self.flatten)


class ResNet(nn.Module):
    """timm-compatible ResNet: `forward_features`, `forward_head(x, pre_logits)`, `num_features`,
    `global_pool`, `fc` (nn.Identity when num_classes=0: forward returns pooled features)."""

    def __init__(
            self,
            block: type[BasicBlock | Bottleneck],
            layers: tuple[int, ...],
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_width: int = 64,
            stem_type: str = '',
            avg_down: bool = False,
            channels: tuple[int, ...] = (64, 128, 256, 512),
            drop_rate: float = 0.0,
            zero_init_last: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        if stem_type == 'deep_tiered':
            inplanes = stem_width * 2
            c0, c1 = 3 * (stem_width // 4), stem_width
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, c0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.Conv2d(c0, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
                nn.Conv2d(c1, inplanes, 3, padding=1, bias=False))
        elif stem_type == '':
            inplanes = 64
            self.conv1 = nn.Conv2d(in_chans, inplanes, 7, stride=2, padding=3, bias=False)
        else:
            raise ConfigError(f"unsupported stem_type {stem_type!r} (use '' or 'deep_tiered')")
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        for i, (planes, n) in enumerate(zip(channels, layers)):
            stride = 1 if i == 0 else 2
            outplanes = planes * block.expansion
            down = None
            if stride != 1 or inplanes != outplanes:
                down = _downsample(inplanes, outplanes, stride, avg_down)
            blocks = [block(inplanes, planes, stride, down)]
            blocks += [block(outplanes, planes) for _ in range(n - 1)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            inplanes = outplanes

        self.num_features = self.head_hidden_size = inplanes
        self.reset_classifier(num_classes, global_pool)
        self.init_weights(zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        """New head, as timm's: num_classes=0 gives nn.Identity; global_pool '' keeps the map."""
        if global_pool not in ('avg', ''):
            raise ConfigError(f"unsupported global_pool {global_pool!r} (use 'avg' or '')")
        self.num_classes = num_classes
        self.global_pool = GlobalAvgPool() if global_pool == 'avg' else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Architecture of each name, as timm registers it; `first_conv` is timm's pretrained_cfg entry
# naming the stem convolution (the key whose weight has `in_chans` input channels).
MODEL_CFGS = {
    'resnet10t': dict(block=BasicBlock, layers=(1, 1, 1, 1), stem_width=32, stem_type='deep_tiered',
                      avg_down=True),
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
}
FIRST_CONV = {'resnet10t': 'conv1.0', 'resnet18': 'conv1', 'resnet50': 'conv1'}


def check_model_name(name: str) -> None:
    if name not in MODEL_CFGS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_CFGS)}")


def create_resnet(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    check_model_name(name)
    return ResNet(num_classes=num_classes, in_chans=in_chans, **dict(MODEL_CFGS[name], **kwargs))
