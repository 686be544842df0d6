"""VGG with batch norm, CIFAR variant (Simonyan & Zisserman, 2015; BN as in Network Slimming).

Conv3x3-BN-ReLU stacks separated by 2x2 max pools, then global average pooling and one Linear
``fc``. The pools use ``ceil_mode=True`` so that a 1x1 map stays 1x1: VGG-16 has five pools,
which would shrink an 8x8 digit to nothing otherwise.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# Channel counts; "M" is a max pool.
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    """``features`` (conv/BN/ReLU/pool) -> global average pool -> ``fc``."""

    def __init__(self, cfg: list[int | str], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_channels)
        last = [c for c in cfg if isinstance(c, int)][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


def _make_features(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            continue
        assert isinstance(item, int)
        layers += [
            nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(item),
            nn.ReLU(inplace=True),
        ]
        channels = item
    return nn.Sequential(*layers)


def vgg11(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """VGG-11 with batch norm (9.2 M parameters)."""
    return VGG(VGG_CFGS["vgg11"], in_channels, num_classes, **kwargs)


def vgg16(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """VGG-16 with batch norm (14.7 M parameters)."""
    return VGG(VGG_CFGS["vgg16"], in_channels, num_classes, **kwargs)
