"""Feature-map reconstruction after channel removal (He et al., ICCV 2017; used by AMC).

When channels are removed, every layer that consumed them (the "next layer") loses part of its
input. Its weights are refitted by least squares so that, on sampled input positions, the pruned
layer's output matches the dense model's output: ``min ||X_pruned W^T - (Y_dense - b)||``. For
kxk convolutions the inputs are unfolded (im2col); 1x1 convolutions and linear layers are the
special case k = 1. Layers are refitted in network order, each on the features produced by the
already-refitted layers before it, as in the paper.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.engine.space import PruningSpace


def consumers(space: PruningSpace, removed: list[int] | None = None) -> list[str]:
    """Names of the conv (groups=1) and linear layers whose input channels a policy shrinks."""
    order = {name: i for i, name in enumerate(space.layers)}
    names: set[str] = set()
    for unit in space.units:
        if removed is not None and removed[unit.index] <= 0:
            continue
        for m in unit.members:
            geo = space.layers.get(m.module)
            if geo is not None and not m.is_out and geo.groups == 1:
                names.add(m.module)
    return sorted(names, key=order.__getitem__)


REFITTABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""The layers least-squares reconstruction refits."""


def check_refittable(model: nn.Module, space: PruningSpace) -> None:
    """Refuse, before any search, a task with ``reconstruct`` whose policies would shrink the
    inputs of a layer reconstruction cannot refit (3-D or transposed convolutions)."""
    modules = dict(model.named_modules())
    bad = [n for n in consumers(space) if not isinstance(modules[n], REFITTABLE)]
    if bad:
        kinds = sorted({type(modules[n]).__name__ for n in bad})
        raise ValueError(
            f"reconstruction refits 1-D and 2-D convolutions and linear layers; the layers "
            f"{bad} ({', '.join(kinds)}) lose input channels: turn reconstruction off for this "
            "model, or keep the units that feed them out of the search with ignore"
        )


def _capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
    """The input (``want="in"``) or output of module ``name`` for a batch."""
    module = dict(model.named_modules())[name]
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(inputs[0] if want == "in" else out)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _rows_conv(
    layer: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, positions: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # type: ignore[arg-type]
    targets = y.flatten(2)  # (N, C_out, L)
    n, _, length = cols.shape
    pick = torch.randint(0, length, (n, min(positions, length)), generator=gen).to(x.device)
    xs = torch.gather(cols, 2, pick.unsqueeze(1).expand(-1, cols.shape[1], -1))
    ys = torch.gather(targets, 2, pick.unsqueeze(1).expand(-1, targets.shape[1], -1))
    return xs.transpose(1, 2).reshape(-1, cols.shape[1]), ys.transpose(1, 2).reshape(-1, y.shape[1])


def _solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares ``argmin_W ||x W^T - y||^2 + lam ||W||^2`` in float64."""
    x64, y64 = x.double(), y.double()
    gram = x64.T @ x64
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + lam * eye, x64.T @ y64)
    return w.T.to(x.dtype)


def refit_layer(
    pruned: nn.Module,
    dense: nn.Module,
    name: str,
    x: torch.Tensor,
    positions: int = 10,
    ridge: float = 1e-4,
    seed: int = 0,
) -> None:
    """Refit one layer of ``pruned`` in place to reproduce the dense layer's output."""
    layer = dict(pruned.named_modules())[name]
    inputs = _capture(pruned, name, x, "in")
    target = _capture(dense, name, x, "out")
    is_conv = isinstance(layer, nn.modules.conv._ConvNd)
    if is_conv and not isinstance(layer, nn.Conv1d | nn.Conv2d):
        raise ValueError(
            f"reconstruction refits 1-D and 2-D convolutions and linear layers; {name!r} is a "
            f"{type(layer).__name__}: turn reconstruction off for this model"
        )
    if layer.bias is not None:  # type: ignore[truthy-function]
        bias = layer.bias.detach()  # type: ignore[operator]
        # a conv's bias runs along dim 1, a linear layer's along the last
        target = target - (bias.view(1, -1, *[1] * (target.dim() - 2)) if is_conv else bias)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Conv1d):  # as a 2-D convolution over a height of one
        view = SimpleNamespace(
            kernel_size=(1, layer.kernel_size[0]), dilation=(1, layer.dilation[0]),
            padding=(0, layer.padding[0]), stride=(1, layer.stride[0]),
        )  # fmt: skip
        xs, ys = _rows_conv(view, inputs.unsqueeze(2), target.unsqueeze(2), positions, gen)  # type: ignore[arg-type]
    elif isinstance(layer, nn.Conv2d):
        xs, ys = _rows_conv(layer, inputs, target, positions, gen)
    else:
        xs, ys = inputs.reshape(-1, inputs.shape[-1]), target.reshape(-1, target.shape[-1])
    w = _solve(xs, ys, ridge)
    # A new tensor, not an in-place write: the old one may be shared with the dense model.
    layer.weight = nn.Parameter(w.reshape(layer.weight.shape))  # type: ignore[operator]


def reconstruct(
    pruned: nn.Module,
    dense: nn.Module,
    space: PruningSpace,
    x: torch.Tensor,
    removed: list[int] | None = None,
    positions: int = 10,
    seed: int = 0,
) -> list[str]:
    """Refit every layer whose inputs lost channels, in network order; returns their names."""
    names = consumers(space, removed)
    was = pruned.training, dense.training
    pruned.eval()
    dense.eval()
    try:
        for i, name in enumerate(names):
            refit_layer(pruned, dense, name, x, positions=positions, seed=seed + i)
    finally:
        pruned.train(was[0])
        dense.train(was[1])
    return names
