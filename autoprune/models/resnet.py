"""CIFAR-style ResNets (He et al., CVPR 2016, section 4.2) and the plain net of AMC.

Depth is ``6n + 2``: a 3x3 stem, three stages of ``n`` BasicBlocks with 16/32/64 channels (the
first block of stages 2 and 3 halves the spatial size), global average pooling and a Linear ``fc``.
Shortcuts use option B (1x1 conv + BN) where the shape changes, identity elsewhere. Every
activation is an ``nn.ReLU`` module, not ``F.relu``, so forward hooks and tracers see it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

STAGE_CHANNELS = (16, 32, 64)


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; ``residual=False`` drops the shortcut (a plain block)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_planes != planes):
            # Option B: a projection where the shape changes (He et al., 2016).
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; works for any input of at least 4x4 pixels."""

    def __init__(
        self, n: int, in_channels: int = 3, num_classes: int = 10, residual: bool = True
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {n}")
        self.conv1 = _conv3x3(in_channels, STAGE_CHANNELS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = STAGE_CHANNELS[0]
        stages = []
        for i, planes in enumerate(STAGE_CHANNELS):
            stride = 1 if i == 0 else 2
            stages.append(_stage(in_planes, planes, n, stride, residual))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_planes: int, planes: int, n: int, stride: int, residual: bool) -> nn.Sequential:
    blocks = [BasicBlock(in_planes, planes, stride, residual)]
    blocks += [BasicBlock(planes, planes, 1, residual) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BN scales, default Linear (as in torchvision's ResNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """ResNet-20 (0.27 M parameters at 10 classes)."""
    return CifarResNet(3, in_channels, num_classes, **kwargs)


def resnet32(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """ResNet-32."""
    return CifarResNet(5, in_channels, num_classes, **kwargs)


def resnet56(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """ResNet-56 (the CIFAR-10 network of AMC's channel-pruning experiments)."""
    return CifarResNet(9, in_channels, num_classes, **kwargs)


def plain20(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """ResNet-20 without shortcuts: AMC's Plain-20, where every layer prunes independently."""
    return CifarResNet(3, in_channels, num_classes, residual=False, **kwargs)
