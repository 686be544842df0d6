"""MobileNetV2 (Sandler et al., CVPR 2018), CIFAR variant.

Inverted residual blocks (1x1 expand by 6, depthwise 3x3, 1x1 linear projection; ReLU6). As in
the common CIFAR adaptation, the stem and the second stage use stride 1 instead of 2, so the
network downsamples only three times (32 -> 4 pixels, 8 -> 1 pixel).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s); strides adapted to small images.
CIFAR_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never dropping more than 10% (TF reference)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_bn(in_c: int, out_c: int, kernel: int, stride: int, groups: int, act: bool) -> list:
    layers: list[nn.Module] = [
        nn.Conv2d(in_c, out_c, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear); residual if shapes agree."""

    def __init__(self, in_c: int, out_c: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_c * expand_ratio
        self.use_residual = stride == 1 and in_c == out_c
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn(in_c, hidden, 1, 1, 1, act=True)
        layers += _conv_bn(hidden, hidden, 3, stride, hidden, act=True)
        layers += _conv_bn(hidden, out_c, 1, 1, 1, act=False)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv -> inverted residual blocks -> 1x1 conv -> global pool -> ``fc``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        last_channels: int = 1280,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        stem = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, stem, 3, 1, 1, act=True))]
        channels = stem
        for t, c, n, s in CIFAR_SETTINGS:
            out_c = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_c, s if i == 0 else 1, t))
                channels = out_c
        last = make_divisible(last_channels * max(1.0, width_mult))
        layers.append(nn.Sequential(*_conv_bn(channels, last, 1, 1, 1, act=True)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def mobilenetv2(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """MobileNetV2 for small images; ``width_mult`` scales every layer's channels."""
    return MobileNetV2(in_channels, num_classes, **kwargs)
