"""The pruning space of a model: its units for a granularity and their analytic costs.

A *unit* is one decision of a policy. For channel pruning it is a torch-pruning dependency group
(coupled layers that must lose the same channels, e.g. every conv writing into one residual
stage), named by its root module, the first conv/linear of the group in network order. For
fine-grained and N:M pruning it is one conv or linear weight tensor.

The model is traced once (torch-pruning's DepGraph) when the space is built. Everything a policy
needs afterwards, which channels of which module a unit removes and what a ratio vector costs,
is read from tables built here, so that evaluating a policy never re-traces (DESIGN: analytic
costs; issue 2: trace once per task, not once per policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from autoprune.models import classifier_name

GRANULARITIES = ("channel", "fine", "nm")
UNIT_KINDS = ("conv", "dwconv", "linear")


class SpaceError(ValueError):
    """A pruning space cannot be built or a policy does not fit it."""


@dataclass
class LayerGeometry:
    """The shape of one conv or linear layer in the dense model, as seen in one forward pass."""

    name: str
    kind: str  # conv, dwconv or linear
    in_channels: int
    out_channels: int
    kernel: int  # kernel height * width (1 for linear)
    stride: int
    groups: int
    in_size: int  # input feature-map side (1 for linear)
    positions: int  # output positions per sample (H_out * W_out; rows for linear)
    bias: bool

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates per sample."""
        return self.positions * self.kernel * self.out_channels * self.in_channels // self.groups


@dataclass
class Member:
    """One module a channel unit prunes: which handler, and which of its indices per root channel.

    ``idxs[j]`` is removed whenever root channel ``root_idxs[j]`` is (torch-pruning's index
    mapping: identity for coupled convs, one-to-many for a flatten into a linear layer).
    """

    module: str
    handler: Callable[..., Any]
    pruning_dim: int
    is_out: bool
    idxs: np.ndarray
    root_idxs: np.ndarray

    def indices_for(self, removed_roots: np.ndarray) -> list[int]:
        """The module's indices to remove when the unit removes ``removed_roots``."""
        if len(self.idxs) == len(self.root_idxs) and np.array_equal(self.idxs, self.root_idxs):
            return removed_roots.tolist()  # the common identity mapping, no search needed
        return self.idxs[np.isin(self.root_idxs, removed_roots)].tolist()


@dataclass
class Unit:
    """One decision of a policy, with the features an agent observes (AMC's layer embedding)."""

    index: int
    name: str
    kind: str  # conv, dwconv or linear
    size: int  # channels (channel) or weights (fine / nm)
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    fmap: int  # input feature-map side
    macs: int  # dense MACs of the layers this unit shrinks
    params: int
    members: list[Member] = field(default_factory=list, repr=False)
    nm_eligible: bool = True

    def features(self) -> dict[str, float]:
        """Raw (unscaled) state features of this unit."""
        return {
            "index": float(self.index),
            "kind": float(UNIT_KINDS.index(self.kind)),
            "in_channels": float(self.in_channels),
            "out_channels": float(self.out_channels),
            "stride": float(self.stride),
            "kernel": float(self.kernel),
            "fmap": float(self.fmap),
            "macs": float(self.macs),
        }


def _geometry(model: nn.Module, example: torch.Tensor) -> dict[str, LayerGeometry]:
    """Record every conv / linear layer's input and output shapes in one forward pass."""
    found: dict[str, LayerGeometry] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                dw = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
                found[name] = LayerGeometry(
                    name=name,
                    kind="dwconv" if dw else "conv",
                    in_channels=mod.in_channels,
                    out_channels=mod.out_channels,
                    kernel=kh * kw,
                    stride=int(mod.stride[0]),
                    groups=mod.groups,
                    in_size=int(x.shape[-1]),
                    positions=int(out.shape[-1] * out.shape[-2]),
                    bias=mod.bias is not None,
                )
            elif isinstance(mod, nn.Linear):
                rows = int(out.numel() // (out.shape[0] * out.shape[-1]))
                found[name] = LayerGeometry(
                    name, "linear", mod.in_features, mod.out_features, 1, 1, 1, 1, rows,
                    mod.bias is not None,
                )  # fmt: skip

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


class PruningSpace:
    """The units of a model for one granularity, and a vectorised analytic cost model.

    Build once per task: ``PruningSpace(model, input_shape, granularity)``. The model is traced
    with torch-pruning for channel granularity; the model itself is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        granularity: str = "channel",
        max_ratio: float = 0.8,
        round_to: int = 1,
        nm_m: int = 4,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise SpaceError(f"unknown granularity {granularity!r}; choose from {GRANULARITIES}")
        if not 0 < max_ratio < 1:
            raise SpaceError(f"max_ratio must be in (0, 1), got {max_ratio}")
        self.granularity = granularity
        self.max_ratio = float(max_ratio)
        self.round_to = int(round_to)
        self.nm_m = int(nm_m)
        self.input_shape = tuple(int(s) for s in input_shape)
        device = next(model.parameters()).device
        example = torch.zeros((1, *self.input_shape), device=device)
        was_training = model.training
        model.eval()
        try:
            self.layers = _geometry(model, example)
            self.classifier = classifier_name(model)
            if granularity == "channel":
                self.units = self._channel_units(model, example)
            else:
                self.units = self._weight_units()
        finally:
            model.train(was_training)
        if not self.units:
            raise SpaceError("the model has no prunable units for this granularity")
        self._by_name = {u.name: u for u in self.units}
        self.total_params = sum(p.numel() for p in model.parameters())
        self._build_cost_tables(model)

    # ----------------------------------------------------------------- units
    def _channel_units(self, model: nn.Module, example: torch.Tensor) -> list[Unit]:
        names = {id(m): n for n, m in model.named_modules()}
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        classifier = dict(model.named_modules())[self.classifier]
        graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
        units = []
        for group in graph.get_all_groups(ignored_layers=[classifier]):
            members = [self._member(item, names) for item in group.items]
            real = [m for m in members if m is not None]
            outs = [m.module for m in real if m.is_out and m.module in self.layers]
            if not outs:
                continue
            root = min(outs, key=order.__getitem__)
            units.append(self._channel_unit(root, real))
        units.sort(key=lambda u: order[u.name])
        for i, u in enumerate(units):
            u.index = i
        return units

    @staticmethod
    def _member(item: Any, names: Mapping[int, str]) -> Member | None:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or id(module) not in names:
            return None  # graph-only ops (add, reshape): nothing to prune on a copy
        handler = item.dep.handler
        return Member(
            module=names[id(module)],
            handler=handler,
            pruning_dim=item.dep.target.pruning_dim,
            is_out=handler.__name__ == "prune_out_channels",
            idxs=np.asarray(item.idxs, dtype=np.int64),
            root_idxs=np.asarray(item.root_idxs, dtype=np.int64),
        )

    def _channel_unit(self, root: str, members: list[Member]) -> Unit:
        geo = self.layers[root]
        shrunk = {m.module for m in members if m.is_out and m.module in self.layers}
        shrunk |= {m.module for m in members if self.layers.get(m.module, geo).kind == "dwconv"}
        macs = sum(self.layers[n].macs for n in shrunk if n in self.layers)
        return Unit(
            index=0,
            name=root,
            kind=geo.kind,
            size=geo.out_channels,
            in_channels=geo.in_channels,
            out_channels=geo.out_channels,
            kernel=geo.kernel,
            stride=geo.stride,
            fmap=geo.in_size,
            macs=macs,
            params=0,
            members=members,
        )

    def _weight_units(self) -> list[Unit]:
        units = []
        for i, geo in enumerate(self.layers.values()):
            size = geo.out_channels * (geo.in_channels // geo.groups) * geo.kernel
            eligible = (geo.in_channels // geo.groups) % self.nm_m == 0
            if self.granularity == "nm" and not eligible:
                continue  # N:M groups run along the input channels; too few of them
            units.append(
                Unit(
                    index=i,
                    name=geo.name,
                    kind=geo.kind,
                    size=size,
                    in_channels=geo.in_channels,
                    out_channels=geo.out_channels,
                    kernel=geo.kernel,
                    stride=geo.stride,
                    fmap=geo.in_size,
                    macs=geo.macs,
                    params=size,
                    nm_eligible=eligible,
                )
            )
        for i, u in enumerate(units):
            u.index = i
        return units

    # ------------------------------------------------------------ accessors
    def __len__(self) -> int:
        return len(self.units)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit(self, name: str) -> Unit:
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self.names if name.split(".")[-1] in n][:5]
            hint = f"; similar: {close}" if close else f"; units are: {self.names[:8]}..."
            raise SpaceError(f"unknown unit {name!r}{hint}") from None

    def ratio_vector(
        self, ratios: Mapping[str, float] | Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """Ratios by unit name (missing units: 0) or in unit order -> a validated vector."""
        if isinstance(ratios, Mapping):
            vec = np.zeros(len(self.units))
            for name, r in ratios.items():
                vec[self.unit(name).index] = float(r)
        else:
            vec = np.asarray(ratios, dtype=np.float64).reshape(-1)
            if vec.shape[0] != len(self.units):
                raise SpaceError(f"expected {len(self.units)} ratios, got {vec.shape[0]}")
        bad = np.flatnonzero((vec < 0) | (vec > self.max_ratio + 1e-9) | ~np.isfinite(vec))
        if bad.size:
            i = int(bad[0])
            raise SpaceError(
                f"ratio {vec[i]!r} of unit {self.units[i].name!r} is outside [0, {self.max_ratio}]"
            )
        return vec

    # ------------------------------------------------------- ratio -> count
    def removed_counts(self, ratios: np.ndarray) -> np.ndarray:
        """How many channels / weights each unit removes for a ratio vector (the one rounding rule
        shared by pruning and costs, so analytic and measured costs agree)."""
        sizes = self._sizes
        if self.granularity == "nm":
            m = self.nm_m
            floor_n = max(1, m - int(np.floor(self.max_ratio * m + 1e-9)))
            keep_n = np.clip(m - np.rint(ratios * m), floor_n, m)
            return (sizes * (m - keep_n) / m).astype(np.int64)
        most = np.floor(self.max_ratio * sizes + 1e-9)  # achieved ratios never pass max_ratio
        removed = np.minimum(np.rint(ratios * sizes), most)
        if self.granularity == "fine":
            return removed.astype(np.int64)
        keep = sizes - removed
        if self.round_to > 1:
            keep = np.rint(keep / self.round_to) * self.round_to
            keep = np.maximum(keep, np.ceil((sizes - most) / self.round_to) * self.round_to)
            keep = np.minimum(keep, sizes)
        keep = np.maximum(keep, 1)
        return (sizes - keep).astype(np.int64)

    def achieved_ratios(self, ratios: np.ndarray) -> np.ndarray:
        """The ratios actually applied after rounding to whole channels / patterns."""
        return self.removed_counts(ratios) / self._sizes

    # ------------------------------------------------------------ cost model
    def _build_cost_tables(self, model: nn.Module) -> None:
        """Per-layer coefficients so that MACs and params of any ratio vector are a few numpy ops.

        Channel: a layer's kept in/out channels are ``total - A @ removed`` where ``A[l, u]`` is how
        many of layer l's channels one removed root channel of unit u takes away (1 for coupled
        layers, H*W for a flatten). MACs = positions * k * kin * kout / groups (depthwise: k *
        kout); params = weights + bias + BN affine. Fine / N:M: only non-zero weights count.
        """
        self._sizes = np.array([u.size for u in self.units], dtype=np.float64)
        names = list(self.layers)
        modules = dict(model.named_modules())
        bns = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        n_l, n_u = len(names), len(self.units)
        self._a_in = np.zeros((n_l, n_u))
        self._a_out = np.zeros((n_l, n_u))
        self._a_bn = np.zeros((len(bns), n_u))
        geo = [self.layers[n] for n in names]
        self._in = np.array([g.in_channels for g in geo], dtype=np.float64)
        self._out = np.array([g.out_channels for g in geo], dtype=np.float64)
        self._bn_total = np.array([modules[n].num_features for n in bns], dtype=np.float64)
        dw = np.array([g.kind == "dwconv" for g in geo])
        self._dw = dw
        self._mac_coef = np.array(
            [g.positions * g.kernel / (1 if g.kind == "dwconv" else g.groups) for g in geo]
        )
        self._w_coef = np.array([g.kernel / (1 if g.kind == "dwconv" else g.groups) for g in geo])
        self._bias = np.array([1.0 if g.bias else 0.0 for g in geo])
        self._bn_affine = np.array([2.0 if modules[n].affine else 0.0 for n in bns])
        self._layer_names = names
        self._bn_names = bns
        self.dense_macs = float(sum(g.macs for g in geo))
        modeled = self._params_from(self._in, self._out, self._bn_total)
        self._other_params = self.total_params - modeled
        if self.granularity == "channel":
            self._fill_channel_maps(names, bns)
        else:
            self._unit_layer = np.array([names.index(u.name) for u in self.units])
        self.dense_params = float(self.total_params)

    def _fill_channel_maps(self, names: list[str], bns: list[str]) -> None:
        li = {n: i for i, n in enumerate(names)}
        bi = {n: i for i, n in enumerate(bns)}
        for u in self.units:
            for m in u.members:
                mult = len(m.idxs) / max(1, len(np.unique(m.root_idxs)))
                if m.module in li:
                    geo = self.layers[m.module]
                    if m.is_out or geo.kind == "dwconv":
                        self._a_out[li[m.module], u.index] = mult
                    if not m.is_out or geo.kind == "dwconv":
                        self._a_in[li[m.module], u.index] = mult
                elif m.module in bi:
                    self._a_bn[bi[m.module], u.index] = mult

    def _params_from(self, kin: np.ndarray, kout: np.ndarray, kbn: np.ndarray) -> float:
        conv_in = np.where(self._dw, 1.0, kin)
        weights = self._w_coef * conv_in * kout
        return float(weights.sum() + (self._bias * kout).sum() + (self._bn_affine * kbn).sum())

    def layer_channels(self, ratios: np.ndarray) -> dict[str, tuple[int, int]]:
        """Kept (in, out) channels of every conv / linear layer for a channel ratio vector."""
        removed = self.removed_counts(ratios).astype(np.float64)
        kin = self._in - self._a_in @ removed
        kout = self._out - self._a_out @ removed
        return {n: (int(i), int(o)) for n, i, o in zip(self._layer_names, kin, kout, strict=True)}

    def costs(self, ratios: np.ndarray) -> tuple[float, float]:
        """Analytic (MACs, params) of a ratio vector, without tracing (tens of microseconds)."""
        removed = self.removed_counts(ratios).astype(np.float64)
        if self.granularity != "channel":
            frac = removed / self._sizes
            macs = self.dense_macs - float(self._unit_macs() @ frac)
            return macs, self.dense_params - float(removed.sum())
        kin = self._in - self._a_in @ removed
        kout = self._out - self._a_out @ removed
        kbn = self._bn_total - self._a_bn @ removed
        macs = float((self._mac_coef * np.where(self._dw, 1.0, kin) * kout).sum())
        return macs, self._params_from(kin, kout, kbn) + self._other_params

    def _unit_macs(self) -> np.ndarray:
        return np.array([u.macs for u in self.units], dtype=np.float64)

    def cost_ratios(self, ratios: np.ndarray) -> dict[str, float]:
        """MACs and params of a ratio vector as fractions of the dense model."""
        macs, params = self.costs(ratios)
        return {"flops": macs / self.dense_macs, "params": params / self.dense_params}

    def describe(self) -> list[dict[str, Any]]:
        """One row per unit, for tables and the CLI."""
        return [
            {
                "unit": u.name,
                "kind": u.kind,
                "size": u.size,
                "in": u.in_channels,
                "out": u.out_channels,
                "kernel": math.isqrt(u.kernel),
                "stride": u.stride,
                "fmap": u.fmap,
                "macs": u.macs,
            }
            for u in self.units
        ]
