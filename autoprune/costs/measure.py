"""Resource costs of a (possibly pruned) model: MACs, parameters, measured latency, and
NetAdapt's per-layer latency lookup table.

* :func:`measure_macs` traces one forward pass with ``FlopCounterMode``; with ``nonzero_only``
  the conv / linear layers count only their non-zero weights, which is how the design counts the
  FLOPs of fine-grained and N:M pruned models (masked with zeros, not physically smaller).
* :func:`count_params` counts parameters, optionally without the zeros of pruned weights.
* :func:`measure_latency` is the median wall time of a forward pass on CPU;
  :func:`measure_latencies` times several models in the same interleaved rounds (for ratios).
* :class:`LatencyTable` predicts the latency of a channel-pruned model without running it:
  NetAdapt (Yang et al., ECCV 2018, section 3.3) measures every layer once at a grid of
  (in, out) channel counts and sums per-layer lookups. The table is cached on disk because
  building it takes seconds and the search asks it thousands of times.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.engine.surgery import LAYERS, TRANSPOSED

logger = logging.getLogger(__name__)

TABLE_FORMAT = 1
"""Version of the latency table's JSON layout; part of the cache key."""

# Parameter-free activations a table replica may append after a layer (class name -> class).
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid)
}
_FORWARD_ERRORS = (RuntimeError, ValueError, IndexError)
_WARMUP_ROUNDS = 3  # untimed rounds of table measurements (first calls allocate and plan)


# ----------------------------------------------------------------------------- shared helpers


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (one sample, no batch dimension)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    return shape


def _check_positive(**values: int | None) -> None:
    """Raise a ValueError naming the first argument that is below 1 (``None`` is allowed)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored after
    (also on error). ``None`` leaves the thread count alone."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _hooks(
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


def _forward(model: nn.Module, x: torch.Tensor, input_shape: tuple[int, ...]) -> Any:
    """``model(x)``, with a forward failure re-raised as a ValueError naming ``input_shape``."""
    is_conv = lambda m: isinstance(m, nn.modules.conv._ConvNd)  # noqa: E731
    try:
        with _hooks(model, is_conv, _check_conv_rank, pre=True):
            return model(x)
    except _FORWARD_ERRORS as err:
        raise ValueError(
            f"input_shape {input_shape} does not fit the model ({err}); input_shape is one "
            "sample without the batch dimension, e.g. (C, H, W)"
        ) from err


# ----------------------------------------------------------------------------- MACs and params


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


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, LAYERS)


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
    shape = _check_shape(input_shape)
    x = torch.zeros((1, *shape), device=_model_device(model))
    layers: list[tuple[int, int]] = []  # (dense, non-zero) MACs of every conv / linear call

    def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        layers.append(_layer_macs(module, inputs[0], output))

    sparse = _hooks(model, _is_layer, record, pre=False) if nonzero_only else nullcontext()
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), _countable_attention(), sparse, counter:
        _forward(model, x, shape)
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


# ----------------------------------------------------------------------------- latency


def _round_robin(
    calls: Sequence[Callable[[], Any]], warmup: int, repeats: int, rerun: bool = False
) -> list[float]:
    """Median wall seconds of each call, timed in ``repeats`` interleaved rounds (each call once
    per round) after ``warmup`` untimed rounds.

    Interleaving spreads a busy spell of a shared machine over all calls alike, so their ratios
    stay right even when the absolute speed drifts during the measurement; the median, not the
    mean, so that a run preempted by another process does not count.

    ``rerun``: each call runs once untimed right before its timed run, so that it is timed warm.
    Whole models need it: a round of many models evicts each other's kernels from oneDNN's
    primitive cache (1,024 entries by default), and a model's first pass after the others then
    pays for re-creating them. Timed one pass each in rounds of 14 models, MobileNetV2's pruned
    models measured 0.58-0.80 of the dense latency; timed warm, alone or with the dense model
    only, 0.33-0.43.
    """
    for _ in range(warmup):
        for fn in calls:
            fn()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for fn, bucket in zip(calls, times, strict=True):
            if rerun:
                fn()
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


@contextmanager
def _cpu_forward(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int
) -> Iterator[Callable[[], Any]]:
    """A no-argument call running one forward pass of a random batch on CPU, valid inside the
    block (eval mode, ``torch.inference_mode``). A model on another device is copied to CPU;
    a shape that does not fit fails here, before any timing."""
    if _model_device(model).type != "cpu":
        model = copy.deepcopy(model).cpu()
    x = torch.randn(batch_size, *input_shape)
    with _eval_mode(model), torch.inference_mode():
        _forward(model, x, input_shape)
        yield lambda: model(x)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> float:
    """Median wall seconds of one forward pass of ``batch_size`` samples on CPU.

    Runs in eval mode under ``torch.inference_mode`` with ``threads`` torch threads (``None``:
    leave torch's setting), restoring the previous thread count and the model's train/eval
    flags afterwards, also on error. A model on another device is measured on a CPU copy.
    The median, not the mean, because one preempted run on a shared machine must not count.
    """
    return measure_latencies([model], input_shape, batch_size, threads, warmup, repeats)[0]


def measure_latencies(
    models: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> list[float]:
    """Median wall seconds of one forward pass of each model, all timed in the same interleaved
    rounds (each model once per round, timed warm: right after an untimed pass of its own, see
    :func:`_round_robin`).

    The way to compare models, e.g. a pruned model against its dense one: measured one after
    the other, a machine whose speed changes in between (another process starts, a frequency
    drop) puts the change into their ratio; interleaved, both see it alike. Same conditions as
    :func:`measure_latency`; every model's shape is checked by one forward pass before any
    timing.
    """
    shape = _check_shape(input_shape)
    _check_positive(batch_size=batch_size, threads=threads, repeats=repeats)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    models = list(models)
    if not models:
        raise ValueError("measure_latencies needs at least one model")
    with _num_threads(threads), ExitStack() as stack:
        runs = [stack.enter_context(_cpu_forward(m, shape, batch_size)) for m in models]
        return _round_robin(runs, warmup, repeats, rerun=len(runs) > 1)


# ----------------------------------------------------------------------------- latency table


@dataclass(frozen=True)
class LayerSpec:
    """What determines the latency of one conv / linear layer of a model, as it was built.

    ``input_shape`` is what the layer sees for one sample (no batch). ``bn`` / ``act`` are the
    BatchNorm2d and activation that run right after the layer in the forward pass, timed with it
    because a real runtime executes them on the layer's output (``act`` is a class name of
    ``_ACTIVATIONS``). ``calls`` counts how often the forward pass runs the layer.
    """

    name: str
    kind: str  # "conv", "tconv" (transposed) or "linear"
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    kernel_size: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = (0, 0)  # a transposed conv's
    bn: bool = False
    act: str | None = None
    act_inplace: bool = False
    calls: int = 1

    @property
    def depthwise(self) -> bool:
        """One filter group per input channel (out = multiplier x in): its grid is 1-D."""
        return self.kind != "linear" and self.groups == self.in_channels and self.groups > 1

    @property
    def channel_step(self) -> int:
        """Channel counts of a grouped (not depthwise) conv stay multiples of ``groups``."""
        return 1 if self.depthwise else self.groups

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        if self.kind != "tconv":  # the layout (and cache key) of tables without transposed convs
            del out["output_padding"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpec:
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)


def _spec_of(name: str, module: nn.Module, x: torch.Tensor) -> LayerSpec:
    """The spec of a conv / linear module from the input tensor it received (batch of one)."""
    per_sample = tuple(int(s) for s in x.shape[1:])
    if isinstance(module, nn.Linear):
        return LayerSpec(
            name, "linear", module.in_features, module.out_features, per_sample,
            bias=module.bias is not None,
        )  # fmt: skip
    if not isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        raise ValueError(
            f"the latency table models nn.Conv2d, nn.ConvTranspose2d and nn.Linear layers; "
            f"{name!r} is a {type(module).__name__}: use a flops or params budget for this model"
        )
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    transposed = isinstance(module, nn.ConvTranspose2d)
    return LayerSpec(
        name=name,
        kind="tconv" if transposed else "conv",
        output_padding=tuple(module.output_padding) if transposed else (0, 0),
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        input_shape=per_sample,
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=padding,
        dilation=tuple(module.dilation),
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )


def _followers(spec: LayerSpec, after: list[nn.Module]) -> LayerSpec:
    """Attach the BatchNorm2d and activation that ran right after a conv (cheap pattern match
    on the order of leaf-module calls; anything else is left to the table's overhead)."""
    bn = False
    if spec.kind != "linear" and after and isinstance(after[0], nn.BatchNorm2d):
        bn = after[0].num_features == spec.out_channels
    act = after[int(bn)] if len(after) > int(bn) else None
    if act is None or type(act) not in _ACTIVATIONS.values():
        return replace(spec, bn=bn)
    inplace = bool(getattr(act, "inplace", False))
    return replace(spec, bn=bn, act=type(act).__name__, act_inplace=inplace)


def _layer_specs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerSpec]:
    """Every Conv2d / Linear the forward pass runs, in call order, from one dense pass."""
    names = {id(m): n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, torch.Tensor | None]] = []  # every leaf-module call, in order

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        calls.append((module, inputs[0] if _is_layer(module) else None))

    is_leaf = lambda m: next(m.children(), None) is None  # noqa: E731
    x = torch.zeros((1, *input_shape), device=_model_device(model))
    with _eval_mode(model), torch.no_grad(), _hooks(model, is_leaf, record, pre=False):
        _forward(model, x, input_shape)
    specs: dict[str, LayerSpec] = {}
    for i, (module, inp) in enumerate(calls):
        if inp is None:
            continue
        name = names[id(module)]
        if name in specs:
            specs[name] = replace(specs[name], calls=specs[name].calls + 1)
            continue
        after = [m for m, _ in calls[i + 1 : i + 3]]
        specs[name] = _followers(_spec_of(name, module, inp), after)
    return list(specs.values())


def _grid_values(channels: int, grid: int, step: int = 1) -> list[int]:
    """``grid`` evenly spaced channel counts from max(1, C / grid) to C, as multiples of
    ``step``, without duplicates (small layers get fewer points)."""
    low = max(1.0, channels / grid)
    values = {max(step, round(v / step) * step) for v in np.linspace(low, channels, grid)}
    return sorted(min(v, channels) for v in values)


def _replica(spec: LayerSpec, cin: int, cout: int) -> nn.Module:
    """A standalone copy of the layer (plus its BN / activation) at (cin, cout) channels."""
    layer: nn.Module
    if spec.kind == "linear":
        layer = nn.Linear(cin, cout, bias=spec.bias)
    elif spec.kind == "tconv":
        layer = nn.ConvTranspose2d(
            cin, cout, spec.kernel_size, spec.stride, spec.padding, spec.output_padding,  # type: ignore[arg-type]
            groups=cin if spec.depthwise else spec.groups, bias=spec.bias,
            dilation=spec.dilation, padding_mode=spec.padding_mode,  # type: ignore[arg-type]
        )  # fmt: skip
    else:
        layer = nn.Conv2d(
            cin, cout, spec.kernel_size, spec.stride, spec.padding, spec.dilation,  # type: ignore[arg-type]
            groups=cin if spec.depthwise else spec.groups, bias=spec.bias,
            padding_mode=spec.padding_mode,  # type: ignore[arg-type]
        )  # fmt: skip
    parts: list[nn.Module] = [layer]
    if spec.bn:
        parts.append(nn.BatchNorm2d(cout))
    if spec.act is not None:
        act_cls = _ACTIVATIONS[spec.act]
        parts.append(act_cls(inplace=True) if spec.act_inplace else act_cls())  # type: ignore[call-arg]
    return nn.Sequential(*parts).eval()


def _replica_input(spec: LayerSpec, cin: int, batch_size: int) -> torch.Tensor:
    """A random input for the replica: the layer's own input shape with ``cin`` channels."""
    shape = list(spec.input_shape)
    shape[-1 if spec.kind == "linear" else 0] = cin
    return torch.randn(batch_size, *shape)


def _replica_call(spec: LayerSpec, cin: int, cout: int, batch_size: int) -> Callable[[], Any]:
    """A no-argument call running the replica at (cin, cout) on a fixed random batch."""
    replica = _replica(spec, cin, cout)
    x = _replica_input(spec, cin, batch_size)
    return lambda: replica(x)


@dataclass
class LayerLatency:
    """One layer's lookup table: ``seconds[i][j]`` is the latency at (``ins[i]``, ``outs[j]``).

    A depthwise layer has a 1-D table: ``outs`` is just its dense out-channel count and the
    lookup follows the in-channels only (its out-channels shrink with them).
    """

    spec: LayerSpec
    ins: list[int]
    outs: list[int]
    seconds: list[list[float]]

    @property
    def dense(self) -> float:
        """Latency of the unpruned layer (all calls)."""
        return self.seconds[-1][-1] * self.spec.calls

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation of the table at (cin, cout), linear extrapolation outside the
        grid, floored at zero; times the number of calls."""
        i0, i1, t = _bracket(self.ins, cin)
        j0, j1, u = _bracket(self.outs, cout)
        s = self.seconds
        value = (1 - t) * ((1 - u) * s[i0][j0] + u * s[i0][j1]) + t * (
            (1 - u) * s[i1][j0] + u * s[i1][j1]
        )
        return max(value, 0.0) * self.spec.calls

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "ins": self.ins,
            "outs": self.outs,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerLatency:
        spec = LayerSpec.from_dict(data["spec"])
        seconds = [[float(v) for v in row] for row in data["seconds"]]
        return cls(spec, [int(v) for v in data["ins"]], [int(v) for v in data["outs"]], seconds)


def _bracket(points: Sequence[int], x: float) -> tuple[int, int, float]:
    """Neighbouring grid indices around ``x`` and its fraction of the way between them (outside
    [0, 1] when extrapolating; 0 for a one-point axis)."""
    if len(points) == 1:
        return 0, 0, 0.0
    j = min(max(int(np.searchsorted(points, x)), 1), len(points) - 1)
    return j - 1, j, (x - points[j - 1]) / (points[j] - points[j - 1])


def _measure_layer(spec: LayerSpec, grid: int, batch_size: int, repeats: int) -> LayerLatency:
    """Time the layer's replicas at every grid point, interleaved (see :func:`_round_robin`)."""
    ins = _grid_values(spec.in_channels, grid, spec.channel_step)
    if spec.depthwise:
        outs = [spec.out_channels]
        points = [(c, c * (spec.out_channels // spec.in_channels)) for c in ins]
    else:
        outs = _grid_values(spec.out_channels, grid, spec.channel_step)
        points = [(i, o) for i in ins for o in outs]
    calls = [_replica_call(spec, i, o, batch_size) for i, o in points]
    flat = _round_robin(calls, _WARMUP_ROUNDS, repeats)
    seconds = [flat[k : k + len(outs)] for k in range(0, len(flat), len(outs))]
    return LayerLatency(spec, ins, outs, seconds)


def _calibrate(
    run_model: Callable[[], Any], grids: Sequence[LayerLatency], batch_size: int, repeats: int
) -> float:
    """Time the dense model and every distinct layer's dense replica in the same rounds, rescale
    each grid so its dense corner matches, and return the model's median seconds.

    The grids of different layers were timed at different moments; a shared machine's speed
    drifts between them. Calibrating all levels in one interleaved run makes the overhead
    (model - sum of layers) a difference of numbers measured under the same conditions.
    """
    dense_calls = [
        _replica_call(g.spec, g.spec.in_channels, g.spec.out_channels, batch_size) for g in grids
    ]
    model_seconds, *levels = _round_robin([run_model, *dense_calls], _WARMUP_ROUNDS, repeats)
    for grid, level in zip(grids, levels, strict=True):
        scale = level / grid.seconds[-1][-1]
        grid.seconds = [[v * scale for v in row] for row in grid.seconds]
    return model_seconds


def _layer_signature(spec: LayerSpec) -> str:
    """Identical layers (ResNet stages repeat them) are measured once."""
    return json.dumps({**spec.to_dict(), "name": None, "calls": None}, sort_keys=True)


def default_cache_dir() -> Path:
    """``$AUTOPRUNE_CACHE/latency`` or ``~/.cache/autoprune/latency``."""
    env = os.environ.get("AUTOPRUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "autoprune") / "latency"


def _table_meta(
    input_shape: tuple[int, ...], batch_size: int, threads: int, grid: int
) -> dict[str, Any]:
    """Everything besides the layers that a measured latency depends on."""
    return {
        "input_shape": list(input_shape),
        "batch_size": batch_size,
        "threads": threads,
        "grid": grid,
        "torch": torch.__version__,
        "processor": platform.processor(),
        "machine": platform.machine(),
    }


def _cache_key(specs: Sequence[LayerSpec], meta: Mapping[str, Any]) -> str:
    payload = {"format": TABLE_FORMAT, "layers": [s.to_dict() for s in specs], "meta": meta}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write to a temp file in the same folder, then ``os.replace``: readers (other processes
    building the same table) see the old file or the whole new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class LatencyTable:
    """NetAdapt's per-layer latency lookup table of one model on this machine.

    ``predict`` = ``overhead`` + the sum over layers of each layer's table at its (in, out)
    channels. ``overhead`` = the dense model's measured latency - the sum of the dense per-layer
    entries; it stands for what the table does not see (pooling, adds, Python overhead) and may
    be negative. Build with :meth:`build` (cached on disk); all times are seconds.
    """

    layers: dict[str, LayerLatency]
    overhead: float
    dense_measured: float
    meta: dict[str, Any]
    key: str
    build_seconds: float = 0.0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_shape: tuple[int, ...],
        grid: int = 6,
        threads: int = 1,
        batch_size: int = 1,
        repeats: int = 30,
        cache_dir: Path | None = None,
    ) -> LatencyTable:
        """Measure (or load from ``cache_dir``, default :func:`default_cache_dir`) the table.

        Every ``nn.Conv2d`` / ``nn.Linear`` the forward pass runs is timed as a standalone
        replica (same kernel, stride, padding, dilation, bias; depthwise stays depthwise; the
        BatchNorm2d + activation that follow it when the call order shows them) at ``grid``
        channel counts per dimension, with ``threads`` torch threads; identical layers are timed
        once. Each grid is timed round-robin, then all grids are rescaled to the dense model
        timed in the same rounds as their dense corners, so a shared machine's changing speed
        does not leak into the overhead (see :func:`_calibrate`).

        The file ``cache_dir/<key>.json`` is named by a hash of the layers and shapes, the
        arguments (except ``repeats``), torch's version and the CPU, so a changed model or
        machine never reads a stale table; it is written atomically.
        """
        shape = _check_shape(input_shape)
        _check_positive(threads=threads, batch_size=batch_size, repeats=repeats)
        if grid < 2:
            raise ValueError(f"grid must be >= 2, got {grid}")
        with _num_threads(threads):  # also for the discovery pass: fast on a loaded machine
            specs = _layer_specs(model, shape)
            if not specs:
                raise ValueError("the model has no nn.Conv2d or nn.Linear layer to tabulate")
            meta = _table_meta(shape, batch_size, threads, grid)
            key = _cache_key(specs, meta)
            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            cached = cls._load(folder / f"{key}.json", key)
            if cached is not None:
                return cached
            table = cls._measure(model, specs, meta, key, repeats)
        _write_json_atomic(folder / f"{key}.json", table.to_dict())
        return table

    @classmethod
    def _measure(
        cls,
        model: nn.Module,
        specs: Sequence[LayerSpec],
        meta: Mapping[str, Any],
        key: str,
        repeats: int,
    ) -> LatencyTable:
        """Time every distinct layer's grid, then calibrate them against the dense model
        (the caller sets the thread count)."""
        start = time.perf_counter()
        shape, batch = tuple(meta["input_shape"]), int(meta["batch_size"])
        with _cpu_forward(model, shape, batch) as run_model:
            grids: dict[str, LayerLatency] = {}
            for spec in specs:
                sig = _layer_signature(spec)
                if sig not in grids:
                    grids[sig] = _measure_layer(spec, int(meta["grid"]), batch, repeats)
            dense = _calibrate(run_model, list(grids.values()), batch, repeats)
        layers = {}
        for spec in specs:
            grid = grids[_layer_signature(spec)]
            layers[spec.name] = LayerLatency(spec, grid.ins, grid.outs, grid.seconds)
        overhead = dense - sum(layer.dense for layer in layers.values())
        elapsed = time.perf_counter() - start
        return cls(layers, overhead, dense, dict(meta), key, elapsed)

    @classmethod
    def _load(cls, path: Path, key: str) -> LatencyTable | None:
        """The cached table at ``path``, or None if absent or unreadable (then it is rebuilt)."""
        if not path.exists():
            return None
        try:
            table = cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable latency table %s: %s", path, err)
            return None
        return table if table.key == key else None

    # ------------------------------------------------------------------------- prediction
    def predict(self, channels: Mapping[str, tuple[int, int]]) -> float:
        """Predicted latency (seconds) with the given (in, out) channels per layer name; layers
        not named are taken dense. Floored at zero (``overhead`` may be negative)."""
        unknown = sorted(set(channels) - set(self.layers))
        if unknown:
            raise ValueError(f"layers not in the latency table: {unknown}")
        total = self.overhead
        for name, layer in self.layers.items():
            cin, cout = channels.get(name, (layer.spec.in_channels, layer.spec.out_channels))
            if cin < 1 or cout < 1:
                raise ValueError(f"layer {name!r} needs >= 1 channel, got (in, out)={cin, cout}")
            total += layer.at(cin, cout)
        return max(total, 0.0)

    def predict_model(self, model: nn.Module) -> float:
        """Predicted latency of a channel-pruned copy of the tabulated model (module names are
        kept by channel pruning), from its layers' actual channel counts."""
        modules = dict(model.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise ValueError(f"the model lacks the tabulated layers {missing}")
        return self.predict({name: _channels_of(name, modules[name]) for name in self.layers})

    @property
    def dense_predicted(self) -> float:
        """The table's prediction for the unpruned model (= ``dense_measured`` by construction,
        unless the overhead floor applies)."""
        return self.predict({})

    # ------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "key": self.key,
            "meta": self.meta,
            "overhead": self.overhead,
            "dense_measured": self.dense_measured,
            "build_seconds": self.build_seconds,
            "layers": [layer.to_dict() for layer in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"latency table format {data.get('format')!r} != {TABLE_FORMAT}")
        layers = [LayerLatency.from_dict(d) for d in data["layers"]]
        return cls(
            layers={layer.spec.name: layer for layer in layers},
            overhead=float(data["overhead"]),
            dense_measured=float(data["dense_measured"]),
            meta=dict(data["meta"]),
            key=str(data["key"]),
            build_seconds=float(data.get("build_seconds", 0.0)),
        )


def _channels_of(name: str, module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise ValueError(
        f"layer {name!r} is a {type(module).__name__}, not a Conv2d, ConvTranspose2d or Linear"
    )
