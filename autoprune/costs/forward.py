"""One checked forward pass, shared by every cost measurement of :mod:`autoprune.costs`.

Argument checks (one sample's ``input_shape``, positive counts), the device a model runs on,
eval mode with every submodule's flag restored, forward hooks for the length of a block, and a
forward pass whose shape failure says what ``input_shape`` means.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from autoprune.engine.surgery import LAYERS

_FORWARD_ERRORS = (RuntimeError, ValueError, IndexError)


def check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (one sample, no batch dimension)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    return shape


def check_positive(**values: int | None) -> None:
    """Raise a ValueError naming the first argument that is below 1 (``None`` is allowed)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def hooks(
    model: nn.Module, select: Callable[[nn.Module], bool], hook: Callable[..., Any], pre: bool
) -> Iterator[None]:
    """Register ``hook`` as a forward (pre-)hook on every selected submodule for the block."""
    handles = [
        m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook)
        for m in model.modules()
        if select(m)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_conv_rank(module: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Forward pre-hook: a conv must see a batched input. A missing channel dimension would
    otherwise pass silently, because ``Conv2d`` also accepts unbatched (C, H, W) tensors."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    want = len(module.kernel_size) + 2
    got = inputs[0].dim()
    if got != want:
        raise ValueError(f"{type(module).__name__} expects a {want}-D batched input, got {got}-D")


def checked_forward(model: nn.Module, x: torch.Tensor, input_shape: tuple[int, ...]) -> Any:
    """``model(x)``, with a forward failure re-raised as a ValueError naming ``input_shape``."""
    is_conv = lambda m: isinstance(m, nn.modules.conv._ConvNd)  # noqa: E731
    try:
        with hooks(model, is_conv, _check_conv_rank, pre=True):
            return model(x)
    except _FORWARD_ERRORS as err:
        raise ValueError(
            f"input_shape {input_shape} does not fit the model ({err}); input_shape is one "
            "sample without the batch dimension, e.g. (C, H, W)"
        ) from err


def is_layer(module: nn.Module) -> bool:
    """Whether a module is a conv / linear layer (a hook selector: the layers costs count)."""
    return isinstance(module, LAYERS)
