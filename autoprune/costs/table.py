"""NetAdapt's per-layer latency lookup table: predict a channel-pruned model's latency without
running it.

:class:`LatencyTable`: NetAdapt (Yang et al., ECCV 2018, section 3.3) measures every layer once
at a grid of (in, out) channel counts and sums per-layer lookups. A :class:`LayerSpec` is what
determines one layer's latency, a :class:`LayerLatency` its measured grid. The table is cached
on disk (:func:`default_cache_dir`, keyed by the layers, the arguments, torch and the CPU)
because building it takes seconds and the search asks it thousands of times.

One concept, a little over 500 lines: what a layer is (its spec), how it is measured (replicas on
a channel grid, calibration) and how the table is kept (cache key, atomic file) change together
whenever the table's format does, so they stay in one module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.costs.forward import (
    check_positive,
    check_shape,
    checked_forward,
    eval_mode,
    hooks,
    is_layer,
    model_device,
)
from autoprune.costs.latency import cpu_forward, num_threads, round_robin

logger = logging.getLogger(__name__)

TABLE_FORMAT = 1
"""Version of the latency table's JSON layout; part of the cache key."""

# Parameter-free activations a table replica may append after a layer (class name -> class).
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid)
}
_WARMUP_ROUNDS = 3  # untimed rounds of table measurements (first calls allocate and plan)


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
        calls.append((module, inputs[0] if is_layer(module) else None))

    is_leaf = lambda m: next(m.children(), None) is None  # noqa: E731
    x = torch.zeros((1, *input_shape), device=model_device(model))
    with eval_mode(model), torch.no_grad(), hooks(model, is_leaf, record, pre=False):
        checked_forward(model, x, input_shape)
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
    """Time the layer's replicas at every grid point, interleaved (see
    :func:`~autoprune.costs.latency.round_robin`)."""
    ins = _grid_values(spec.in_channels, grid, spec.channel_step)
    if spec.depthwise:
        outs = [spec.out_channels]
        points = [(c, c * (spec.out_channels // spec.in_channels)) for c in ins]
    else:
        outs = _grid_values(spec.out_channels, grid, spec.channel_step)
        points = [(i, o) for i in ins for o in outs]
    calls = [_replica_call(spec, i, o, batch_size) for i, o in points]
    flat = round_robin(calls, _WARMUP_ROUNDS, repeats)
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
    model_seconds, *levels = round_robin([run_model, *dense_calls], _WARMUP_ROUNDS, repeats)
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
        shape = check_shape(input_shape)
        check_positive(threads=threads, batch_size=batch_size, repeats=repeats)
        if grid < 2:
            raise ValueError(f"grid must be >= 2, got {grid}")
        with num_threads(threads):  # also for the discovery pass: fast on a loaded machine
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
        with cpu_forward(model, shape, batch) as run_model:
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
