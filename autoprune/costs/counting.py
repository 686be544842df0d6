"""MACs and parameters of a (possibly pruned) model, measured on the model itself.

* :func:`measure_macs` traces one forward pass with ``FlopCounterMode``; with ``nonzero_only``
  the conv / linear layers count only their non-zero weights, which is how the design counts the
  FLOPs of fine-grained and N:M pruned models (masked with zeros, not physically smaller).
* :func:`count_params` counts parameters, optionally without the zeros of pruned weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.costs.forward import (
    check_shape,
    checked_forward,
    eval_mode,
    hooks,
    is_layer,
    model_device,
)
from autoprune.engine.surgery import TRANSPOSED


@contextmanager
def _countable_attention() -> Iterator[None]:
    """Run attention through operations FlopCounterMode counts: ``nn.MultiheadAttention`` (and
    the transformer layers) without their fused eval-mode fast path, and
    ``scaled_dot_product_attention`` with its math kernel (the fused CPU kernels are not counted,
    so attention's projections and products would be missing from the MACs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def measure_macs(model: nn.Module, input_shape: tuple[int, ...], nonzero_only: bool = False) -> int:
    """Multiply-accumulates of one forward pass for one sample (``input_shape`` has no batch).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), so only what it counts:
    convolutions and matrix products (mm / addmm / bmm). Batch norm, pooling, activations,
    element-wise adds and biases are not counted.

    ``nonzero_only=True`` is for fine-grained / N:M pruned models whose weights are zeros: each
    ``nn.Conv2d`` counts (output positions) x nnz(weight) and each ``nn.Linear`` counts
    nnz(weight) x (input rows per sample) instead of its dense count (1-D and 3-D convolutions
    as 2-D ones); everything else stays as
    traced. Both ``torch.nn.utils.prune`` masks and plainly zeroed weights are seen, because the
    hook reads ``module.weight`` after the reparametrisation has run.

    The pass runs in eval mode under ``torch.no_grad`` on the model's device, with attention's
    fused kernels off (FlopCounterMode does not count them); the model's train/eval flags and
    parameters are unchanged afterwards.
    """
    shape = check_shape(input_shape)
    x = torch.zeros((1, *shape), device=model_device(model))
    layers: list[tuple[int, int]] = []  # (dense, non-zero) MACs of every conv / linear call

    def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        layers.append(_layer_macs(module, inputs[0], output))

    sparse = hooks(model, is_layer, record, pre=False) if nonzero_only else nullcontext()
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), _countable_attention(), sparse, counter:
        checked_forward(model, x, shape)
    dense = int(counter.get_total_flops()) // 2
    return dense - sum(d for d, _ in layers) + sum(n for _, n in layers)


def _layer_macs(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    """(dense, non-zero) MACs of one conv / linear call on a batch of one.

    Both are (positions the weight is applied at) x (weight count): a conv weight already holds
    in / groups channels per filter and runs at every output position, a transposed conv's at
    every input position, and a linear layer runs once per input row.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(module, TRANSPOSED):
        rows = x.numel() // x.shape[1]
    else:
        rows = output.numel() // weight.shape[0]
    return rows * weight.numel(), rows * int(torch.count_nonzero(weight))


def count_params(model: nn.Module, nonzero_only: bool = False) -> int:
    """Number of parameters (shared parameters once; buffers such as pruning masks never).

    With ``nonzero_only`` the zeros of weight tensors (2-D and up: conv and linear weights) are
    excluded, and a ``torch.nn.utils.prune`` reparametrised tensor counts the non-zeros of
    ``<name>_orig * <name>_mask``. 1-D parameters (biases, BN scales) count in full: a zero there
    is a value, not a pruned weight.
    """
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += _param_count(module, name, param, nonzero_only)
    return total


def _param_count(module: nn.Module, name: str, param: torch.Tensor, nonzero_only: bool) -> int:
    if not nonzero_only:
        return param.numel()
    mask = module._buffers.get(name.removesuffix("_orig") + "_mask")
    if name.endswith("_orig") and mask is not None:
        return int(torch.count_nonzero(param.detach() * mask))
    if param.dim() >= 2:
        return int(torch.count_nonzero(param.detach()))
    return param.numel()
