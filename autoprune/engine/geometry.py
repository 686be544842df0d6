"""What one forward pass shows of a model's conv and linear layers: their geometry (shapes,
positions, dense MACs), which of them is the classifier, and which modules ``ignore`` names.

Read once when a pruning space is built (:class:`autoprune.engine.space.PruningSpace`), before
any tracing: the analytic cost model and the units' features come from these shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoprune.engine.surgery import CONVS, LAYERS, TRANSPOSED
from autoprune.engine.units import SpaceError


@dataclass
class LayerGeometry:
    """The shape of one conv or linear layer in the dense model, as seen in one forward pass."""

    name: str
    kind: str  # conv, dwconv or linear
    in_channels: int
    out_channels: int
    kernel: int  # kernel elements: height * width (length for 1-D, 1 for linear)
    stride: int
    groups: int
    in_size: int  # input feature-map side (1 for linear)
    # positions per sample at which the weight is applied, every call: output positions of a
    # conv (H_out * W_out), input positions of a transposed conv, rows of a linear layer
    positions: int
    bias: bool
    transposed: bool = False

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates per sample."""
        return self.positions * self.kernel * self.out_channels * self.in_channels // self.groups


def layer_geometry(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, LayerGeometry], Any]:
    """Record every conv / linear layer's input and output shapes in one forward pass (in
    execution order), and return the model's output too. A layer run several times (weight
    sharing) is recorded at its first call with the output positions of all its calls."""
    found: dict[str, LayerGeometry] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inputs[0]
            # a transposed conv applies its weight once per input position (each scatters a
            # kernel-sized patch), a conv once per output position
            applied = x if isinstance(mod, TRANSPOSED) else out
            if name in found:  # a layer run more than once (weight sharing): every call costs
                channels = applied.shape[1] if applied is x else found[name].out_channels
                calls = applied.numel() // (applied.shape[0] * channels)
                found[name].positions += int(calls)
                return
            if isinstance(mod, (*CONVS, *TRANSPOSED)):  # 1-D, 2-D and 3-D: products of sides
                dw = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
                found[name] = LayerGeometry(
                    name=name,
                    kind="dwconv" if dw else "conv",
                    in_channels=mod.in_channels,
                    out_channels=mod.out_channels,
                    kernel=math.prod(mod.kernel_size),
                    stride=int(mod.stride[0]),
                    groups=mod.groups,
                    in_size=int(x.shape[-1]),
                    positions=math.prod(int(d) for d in applied.shape[2:]),
                    bias=mod.bias is not None,
                    transposed=isinstance(mod, TRANSPOSED),
                )
            elif isinstance(mod, nn.Linear):
                rows = int(out.numel() // (out.shape[0] * out.shape[-1]))
                found[name] = LayerGeometry(
                    name, "linear", mod.in_features, mod.out_features, 1, 1, 1, 1, rows,
                    mod.bias is not None,
                )  # fmt: skip

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, LAYERS):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # the user's model: any failure is a shape / input problem
        raise SpaceError(
            f"{type(model).__name__} fails on an input of shape {tuple(example.shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    return found, output


def find_classifier(
    model: nn.Module, layers: Mapping[str, LayerGeometry], output: Any, name: str | None
) -> str:
    """The layer whose outputs are the classes (never pruned): ``name`` when given (checked),
    else the last conv / linear layer, in execution order, with as many outputs as the model
    (a linear head, or a 1x1 conv head followed by pooling as in SqueezeNet)."""
    if name is not None:
        if name not in layers:
            kinds = "a convolution or nn.Linear layer that runs in the forward pass"
            raise SpaceError(f"classifier {name!r} is not {kinds}; layers: {list(layers)[-5:]}")
        return name
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise SpaceError(
            f"{type(model).__name__} returns {shape}, not (batch, classes): name the classifier "
            "layer (model.classifier) so that its outputs are never pruned"
        )
    classes = int(output.shape[1])
    heads = [n for n, g in layers.items() if g.out_channels == classes]
    if not heads:
        raise SpaceError(
            f"no conv / linear layer of {type(model).__name__} has {classes} outputs (the "
            "model's output size): name the classifier layer (model.classifier)"
        )
    return heads[-1]


def expand_ignore(model: nn.Module, ignore: Sequence[str]) -> set[str]:
    """Module names matched by ``ignore`` entries (a name, or a prefix of a submodule tree)."""
    names = [n for n, _ in model.named_modules() if n]
    out: set[str] = set()
    for entry in ignore:
        hits = [n for n in names if n == entry or n.startswith(entry + ".")]
        if not hits:
            close = [n for n in names if entry.split(".")[-1] in n][:5]
            raise SpaceError(f"ignore: {entry!r} is not a module of the model; similar: {close}")
        out.update(hits)
    return out
