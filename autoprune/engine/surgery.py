"""Channel surgery: physically remove channels from one layer, given original channel indices.

The dependency tracing is torch-pruning's (DepGraph); the per-layer removal is ours, because
torch-pruning's grouped-convolution handler assumes every group loses the channels at the same
positions (it keeps the first ``kept // groups`` indices), which silently computes a different
function when the positions differ (issue 13). Every function here:

* takes the indices to remove in the layer's *original* numbering, once per layer and dimension
  (a layer shared by several units, e.g. the convolution after a concatenation, is cut once with
  the union of every unit's channels, so no unit's indices are shifted by another's cut);
* replaces parameters and buffers with new tensors and never writes into the old ones, so a
  structural copy that shares tensors with the dense model (``light_copy``) stays safe.

Operations (``op``): ``out`` / ``in`` for conv, transposed conv and linear layers, ``dw`` for a
depthwise conv or transposed conv (input and output channels are the same channels), ``ch``
for per-channel layers (batch, layer, group and instance norm, PReLU) and ``param`` for a bare
``nn.Parameter`` (layer scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Convolutions (1-D, 2-D and 3-D), weight (out, in / groups, *kernel)."""
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""Transposed convolutions (decoders, upsampling), weight (in, out / groups, *kernel)."""
LAYERS = (*CONVS, *TRANSPOSED, nn.Linear)
"""The layers a unit is made of: convolutions, transposed convolutions and linear layers."""

NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


class SurgeryError(ValueError):
    """Removing these channels from this layer would not give a valid layer."""


def _keep(n: int, removed: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in removed)
    if any(i < 0 or i >= n for i in drop):
        raise SurgeryError(f"channel indices {sorted(drop)} fall outside [0, {n})")
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _select(t: torch.Tensor | None, keep: torch.Tensor, dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().index_select(dim, keep.to(t.device))


def _param(t: torch.Tensor, keep: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(_select(t, keep, dim), requires_grad=t.requires_grad)  # type: ignore[arg-type]


def _per_group(keep: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Kept indices as a (groups, kept per group) table of positions inside each group."""
    size = n // groups
    counts = torch.bincount(keep // size, minlength=groups)
    if not bool((counts == counts[0]).all()):
        raise SurgeryError(
            f"grouped layer ({groups} groups): every group must keep the same number of "
            f"channels, got {counts.tolist()}"
        )
    return (keep % size).reshape(groups, -1)


def _rows(layer: nn.modules.conv._ConvNd | nn.Linear, keep: torch.Tensor) -> int:
    """Keep the output rows ``keep`` of a layer's weight and bias; returns how many remain."""
    layer.weight = _param(layer.weight, keep, 0)
    if layer.bias is not None:
        layer.bias = _param(layer.bias, keep, 0)
    return len(keep)


def conv_out(conv: nn.modules.conv._ConvNd, removed: Sequence[int]) -> None:
    keep = _keep(conv.out_channels, removed)
    if conv.groups > 1:
        _per_group(keep, conv.out_channels, conv.groups)
    conv.out_channels = _rows(conv, keep)


def conv_in(conv: nn.modules.conv._ConvNd, removed: Sequence[int]) -> None:
    keep = _keep(conv.in_channels, removed)
    if conv.groups == 1:
        conv.weight = _param(conv.weight, keep, 1)
    else:  # each output filter keeps the kept inputs of its own group, at their positions
        local = _per_group(keep, conv.in_channels, conv.groups)
        rows = conv.out_channels // conv.groups
        index = local.repeat_interleave(rows, dim=0).to(conv.weight.device)
        w = conv.weight.detach()
        index = index.reshape(*index.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
        conv.weight = nn.Parameter(torch.gather(w, 1, index), requires_grad=w.requires_grad)
    conv.in_channels = len(keep)


def conv_dw(conv: nn.modules.conv._ConvNd, removed: Sequence[int]) -> None:
    conv.out_channels = conv.in_channels = conv.groups = _rows(
        conv, _keep(conv.out_channels, removed)
    )


def out_major(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A layer's weight (or a tensor of its shape, e.g. its gradient) with one row per output
    channel: as stored for convolutions and linear layers, regrouped for a transposed
    convolution, (in, out / g, *k) -> (out, in / g, *k), the layout of the equivalent conv."""
    if not isinstance(layer, TRANSPOSED):
        return weight
    g = layer.groups
    cin, per, *kernel = weight.shape
    grouped = weight.reshape(g, cin // g, per, *kernel).transpose(1, 2)
    return grouped.reshape(g * per, cin // g, *kernel)


def tconv_out(conv: nn.modules.conv._ConvTransposeNd, removed: Sequence[int]) -> None:
    if conv.groups > 1:
        raise SurgeryError("a grouped transposed convolution's output channels cannot be cut")
    keep = _keep(conv.out_channels, removed)
    conv.weight = _param(conv.weight, keep, 1)
    if conv.bias is not None:
        conv.bias = _param(conv.bias, keep, 0)
    conv.out_channels = len(keep)


def tconv_in(conv: nn.modules.conv._ConvTransposeNd, removed: Sequence[int]) -> None:
    if conv.groups > 1:
        raise SurgeryError("a grouped transposed convolution's input channels cannot be cut")
    keep = _keep(conv.in_channels, removed)
    conv.weight = _param(conv.weight, keep, 0)
    conv.in_channels = len(keep)


def linear_out(layer: nn.Linear, removed: Sequence[int]) -> None:
    layer.out_features = _rows(layer, _keep(layer.out_features, removed))


def linear_in(layer: nn.Linear, removed: Sequence[int]) -> None:
    keep = _keep(layer.in_features, removed)
    layer.weight = _param(layer.weight, keep, 1)
    layer.in_features = len(keep)


def norm_channels(layer: nn.Module) -> int:
    """Channels of a per-channel layer (the size surgery cuts)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return int(layer.num_features)
    if isinstance(layer, nn.LayerNorm):
        return int(layer.normalized_shape[-1])
    if isinstance(layer, nn.GroupNorm):
        return int(layer.num_channels)
    if isinstance(layer, nn.PReLU):
        return int(layer.num_parameters)
    raise SurgeryError(f"{type(layer).__name__} is not a per-channel layer")


def channel_wise(layer: nn.Module, removed: Sequence[int]) -> None:
    """Remove channels of a norm / PReLU layer (weights, biases and running statistics)."""
    n = norm_channels(layer)
    keep = _keep(n, removed)
    if isinstance(layer, nn.GroupNorm):
        _per_group(keep, n, layer.num_groups)  # a channel must not move to another group
    dim = -1 if isinstance(layer, nn.LayerNorm) else 0
    for name, p in list(layer._parameters.items()):
        if p is not None:
            setattr(layer, name, _param(p, keep, dim))
    for name, b in list(layer._buffers.items()):
        if b is not None and b.dim() > 0 and b.shape[0] == n:
            layer._buffers[name] = _select(b, keep, 0)
    if isinstance(layer, nn.LayerNorm):
        layer.normalized_shape = (*layer.normalized_shape[:-1], len(keep))
    elif isinstance(layer, nn.GroupNorm):
        layer.num_channels = len(keep)
    elif isinstance(layer, nn.PReLU):
        layer.num_parameters = len(keep)
    else:
        layer.num_features = len(keep)  # type: ignore[assignment]


def parameter(owner: nn.Module, name: str, dim: int, removed: Sequence[int]) -> None:
    """Remove entries of a bare parameter ``owner.<name>`` along ``dim`` (e.g. layer scale)."""
    p = getattr(owner, name)
    keep = _keep(p.shape[dim], removed)
    setattr(owner, name, _param(p, keep, dim))


def cut(module: nn.Module, op: str, removed: Sequence[int]) -> None:
    """Remove ``removed`` (original indices) from ``module`` for operation ``op``."""
    if op in ("out", "in", "dw") and isinstance(module, CONVS):
        {"out": conv_out, "in": conv_in, "dw": conv_dw}[op](module, removed)
    elif op in ("out", "in", "dw") and isinstance(module, TRANSPOSED):
        # a depthwise transposed conv's weight is (channels, 1, *k) like a depthwise conv's
        {"out": tconv_out, "in": tconv_in, "dw": conv_dw}[op](module, removed)
    elif op in ("out", "in") and isinstance(module, nn.Linear):
        (linear_out if op == "out" else linear_in)(module, removed)
    elif op == "ch":
        channel_wise(module, removed)
    else:
        raise SurgeryError(f"cannot apply {op!r} to a {type(module).__name__}")
