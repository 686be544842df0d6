"""A test zoo of small networks, one per dependency structure real architectures contain.

Each model takes a 1x16x16 input and has 10 outputs. They are written here, small and random, to
exercise the channel-pruning engine (issue 13): concatenation (DenseNet, Inception), grouped
convolutions (ResNeXt, RegNet with squeeze-excite), non-module parameters with LayerNorm
(ConvNeXt), a convolutional classifier (SqueezeNet), squeeze-excite with hard-sigmoid
(MobileNetV3), GroupNorm, transposed convolutions (U-Net), chunks feeding different branches
(CSP / C2f), and structures the engine must refuse: a channel shuffle (ShuffleNet), a gated unit
over a chunk's halves, a split at fixed sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (1, 16, 16)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class _Head(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------ concatenation
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(y)))], 1)


class DenseNetTiny(nn.Module):
    """DenseNet-BC: every layer's BN sees the concatenation of all earlier outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(8, 6), DenseLayer(14, 6), DenseLayer(20, 6))
        self.trans_norm = nn.BatchNorm2d(26)
        self.trans = nn.Conv2d(26, 12, 1, bias=False)
        self.block2 = nn.Sequential(DenseLayer(12, 6), DenseLayer(18, 6))
        self.norm = nn.BatchNorm2d(24)
        self.head = _Head(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = F.avg_pool2d(self.trans(F.relu(self.trans_norm(x))), 2)
        return self.head(F.relu(self.norm(self.block2(x))))


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cp: int) -> None:
        super().__init__()
        self.b1 = _cbr(cin, c1, 1)
        self.b2 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
        self.b3 = _cbr(cin, cp, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.b1(x), self.b2(x), self.b3(pooled)], 1)


class InceptionTiny(nn.Module):
    """GoogLeNet-style: two inception blocks, the second consumes the first's concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 12)
        self.inc1 = Inception(12, 8, 6, 10, 6)
        self.inc2 = Inception(24, 10, 8, 12, 6)
        self.head = _Head(28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inc2(self.inc1(self.stem(x))))


# ------------------------------------------------------------- grouped convolutions
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int, gate: Callable[[], nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class GroupedBottleneck(nn.Module):
    """ResNeXt (cardinality ``groups``) or, with ``se``, RegNetY (fixed group width + SE)."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int, se: bool) -> None:
        super().__init__()
        self.conv1 = _cbr(cin, width, 1)
        self.conv2 = _cbr(width, width, 3, stride, groups)
        self.se = SqueezeExcite(width, max(1, cin // 4)) if se else nn.Identity()
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(self.se(self.conv2(self.conv1(x)))))
        return F.relu(y + self.down(x))


class ResNeXtTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 16)
        self.layer1 = nn.Sequential(
            GroupedBottleneck(16, 16, 32, 4, 1, False), GroupedBottleneck(32, 16, 32, 4, 1, False)
        )
        self.layer2 = GroupedBottleneck(32, 32, 48, 8, 2, False)
        self.head = _Head(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


class RegNetTiny(nn.Module):
    """Group width 4 (groups = width / 4), squeeze-excite in every block (RegNetY)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 12, stride=2)
        self.s1 = GroupedBottleneck(12, 16, 16, 4, 1, True)
        self.s2 = GroupedBottleneck(16, 24, 24, 6, 2, True)
        self.head = _Head(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s2(self.s1(self.stem(x))))


# --------------------------------------------------- layer scale and LayerNorm
class ChannelsFirstNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)  # layer scale: not a module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 2, 2), ChannelsFirstNorm(16))
        self.stage1 = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.down = nn.Sequential(ChannelsFirstNorm(16), nn.Conv2d(16, 24, 2, 2))
        self.stage2 = ConvNeXtBlock(24)
        self.norm = nn.LayerNorm(24, eps=1e-6)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


# ------------------------------------------------------------- conv classifier
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)


class SqueezeNetTiny(nn.Module):
    """The classifier is a 1x1 convolution producing the class scores, then a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), Fire(16, 4, 8), Fire(16, 6, 12)
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(24, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).flatten(1)


# ------------------------------------------------- squeeze-excite, GroupNorm, split
class MobileNetV3Tiny(nn.Module):
    """Inverted residuals with depthwise convs, hard-swish and hard-sigmoid squeeze-excite."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=24), nn.BatchNorm2d(24))
        self.se = SqueezeExcite(24, 8, nn.Hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8))
        self.last = nn.Sequential(nn.Conv2d(8, 32, 1), nn.Hardswish())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(F.hardswish(self.dw(self.expand(x)))))
        return self.fc(F.adaptive_avg_pool2d(self.last(x), 1).flatten(1))


class GroupNormNet(nn.Module):
    """A residual stage normalised with GroupNorm (4 groups), and a flatten into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 2, 1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.gn2 = nn.GroupNorm(4, 16)
        self.conv3 = nn.Conv2d(16, 8, 3, 2, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(x + self.gn2(self.conv2(x)))
        return self.fc(F.relu(self.conv3(x)).flatten(1))


class SplitNet(nn.Module):
    """One conv's output split in two halves (``torch.chunk``), each feeding its own branch,
    the second half traced first (torch-pruning 1.6.1 swaps the halves; autoprune maps them by
    the piece each branch reads, and every half loses the same count)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _cbr(1, 16, stride=2)
        self.left = _cbr(8, 12)
        self.right = _cbr(8, 12, k=1)
        self.head = _Head(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.conv1(x), 2, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], 1))


class CSPTiny(nn.Module):
    """A CSP / C2f block (YOLOv8): a 1x1 conv chunked in two, bottlenecks on the second half,
    every piece concatenated (the halves are read twice: by the bottleneck and the concat)."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = _cbr(1, 16, 1)
        self.m = nn.ModuleList([_cbr(8, 8), _cbr(8, 8)])
        self.cv2 = _cbr(32, 16, 1)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.head(self.cv2(torch.cat(y, 1)))


class GatedNet(nn.Module):
    """A gated linear unit over channels (``a * sigmoid(b)`` of one conv's two halves): the
    halves must lose the same positions, which channel pruning cannot tie; refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.post = _cbr(8, 8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, 1)
        return self.head(self.post(a * torch.sigmoid(b)))


class FixedSplitNet(nn.Module):
    """``torch.split`` at sizes written in the forward pass (6 and 10): a pruned tensor would be
    split at the old sizes; refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _cbr(1, 16)
        self.left = _cbr(6, 8)
        self.right = _cbr(10, 8)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), [6, 10], 1)
        return self.head(torch.cat([self.left(a), self.right(b)], 1))


class ShuffleNetTiny(nn.Module):
    """ShuffleNetV2's channel shuffle (view, transpose, view): refused, not mis-pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, stride=2)
        self.branch = nn.Sequential(_cbr(8, 8, 1), _cbr(8, 8, 3, groups=8), _cbr(8, 8, 1))
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x)


# ------------------------------------------------------------------ transposed convolutions
class UNetTiny(nn.Module):
    """An encoder-decoder (U-Net, autoencoders, segmentation heads): transposed convolutions
    upsample (one with output padding and a bias, one depthwise), and the decoder concatenates
    the encoder's skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _cbr(1, 8)
        self.down = _cbr(8, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 12, 3, stride=2, padding=1, output_padding=1)
        self.up_norm = nn.BatchNorm2d(12)
        self.smooth = nn.ConvTranspose2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.fuse = _cbr(12 + 8, 8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        u = self.smooth(F.relu(self.up_norm(self.up(self.down(skip)))))
        return self.head(self.fuse(torch.cat([u, skip], 1)))


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.size()
    x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(n, -1, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 chunks its input (half passes, half through the branch),
    stride 2 runs two branches on the whole input; both end in a channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, mid = stride, cout // 2
        if stride == 2:
            self.branch1 = nn.Sequential(_cbr(cin, cin, 3, 2, groups=cin), _cbr(cin, mid, 1))
        self.branch2 = nn.Sequential(
            _cbr(cin if stride == 2 else mid, mid, 1), _cbr(mid, mid, 3, stride, groups=mid),
            _cbr(mid, mid, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            return _shuffle(torch.cat((x1, self.branch2(x2)), 1))
        return _shuffle(torch.cat((self.branch1(x), self.branch2(x)), 1))


class ShuffleNetV2Tiny(nn.Module):
    """ShuffleNetV2's layout (a stage of one downsampling unit and three chunked ones): the
    tracer of torch-pruning 1.6.1 divides by zero on its shuffles; autoprune leaves those
    reshapes unmapped, refuses the units that cross a shuffle, and prunes the branches' inner
    widths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(1, 8, stride=2)
        units = [_ShuffleUnit(8, 16, 2), *(_ShuffleUnit(16, 16, 1) for _ in range(3))]
        self.stage = nn.Sequential(*units)
        self.conv5 = _cbr(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(self.stage(self.stem(x))).mean((2, 3)))


class RecurrentNet(nn.Module):
    """A conv branch beside a GRU over the image rows: torch-pruning 1.6.1 fails (IndexError)
    mapping the channels of the linear layer that feeds the GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _cbr(1, 8, stride=2)
        self.proj = nn.Linear(16, 12)
        self.gru = nn.GRU(12, 12, batch_first=True)
        self.seq_fc = nn.Linear(12, 10)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.gru(F.relu(self.proj(x.reshape(x.shape[0], 16, 16))))
        return self.seq_fc(seq[:, -1]) + self.fc(self.conv(x).mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, c))


class TinyViT(nn.Module):
    """A vision transformer (patch embedding, position parameter, attention heads, MLPs): the
    residual stream and the heads' reshape are mis-traced, the MLPs' hidden layers are not."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


STRUCTURES: dict[str, Callable[[], nn.Module]] = {
    "densenet": DenseNetTiny,
    "inception": InceptionTiny,
    "resnext": ResNeXtTiny,
    "regnet": RegNetTiny,
    "convnext": ConvNeXtTiny,
    "squeezenet": SqueezeNetTiny,
    "mobilenetv3": MobileNetV3Tiny,
    "groupnorm": GroupNormNet,
    "unet": UNetTiny,
    "split": SplitNet,
    "csp": CSPTiny,
}
"""Structures the engine must prune correctly."""

REFUSED: dict[str, Callable[[], nn.Module]] = {
    "shufflenet": ShuffleNetTiny,
    "gated": GatedNet,
    "fixed_split": FixedSplitNet,
}
"""Structures the engine must refuse at build time: a channel shuffle (torch-pruning 1.6.1
follows it as if it were the identity), the two halves of a chunk multiplied together, a split
at sizes fixed in the forward pass."""


PARTLY: dict[str, Callable[[], nn.Module]] = {
    "recurrent": RecurrentNet,
    "vit": TinyViT,
    "shufflenetv2": ShuffleNetV2Tiny,
}
"""Models where channel pruning refuses some units and can prune the others
(``ignore_unsupported``)."""


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so that zeroed channels matter."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model


def build(in_channels: int = 1, num_classes: int = 10, arch: str = "densenet") -> nn.Module:
    """A ``package.module:factory`` entry point (``structures:build``) for tasks in tests."""
    if in_channels != 1 or num_classes != 10:
        raise TypeError("the test structures take 1 input channel and have 10 classes")
    return randomize_norms({**STRUCTURES, **REFUSED, **PARTLY}[arch]())
