"""The pruning space of a model: its units for a granularity and their analytic costs.

A *unit* (:mod:`autoprune.engine.units`) is one decision of a policy: for channel pruning a
torch-pruning dependency group named by its root module, for fine-grained and N:M pruning one
conv or linear weight tensor.

The model is traced once (torch-pruning's DepGraph, :mod:`autoprune.engine.depgraph`) when the
space is built, and its groups are read into units (:mod:`autoprune.engine.members`).
Everything a policy needs afterwards, which channels of which module a unit removes and what a
ratio vector costs, is read from tables built here, so that evaluating a policy never re-traces
(DESIGN: analytic costs; issue 2: trace once per task, not once per policy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.costs.counting import measure_macs
from autoprune.engine.depgraph import dependency_groups, index_limit, largest_tensor, trace
from autoprune.engine.geometry import expand_ignore, find_classifier, layer_geometry
from autoprune.engine.members import group_members, refusal, unit_cells
from autoprune.engine.surgery import LAYERS, NORMS, norm_channels
from autoprune.engine.units import GRANULARITIES, Member, SpaceError, Unit


class PruningSpace:
    """The units of a model for one granularity, and a vectorised analytic cost model.

    Build once per task: ``PruningSpace(model, input_shape, granularity)``. The model is traced
    with torch-pruning for channel granularity; the model itself is never modified.
    ``classifier`` names the layer whose outputs are the classes (default: found by output size,
    see :func:`~autoprune.engine.geometry.find_classifier`); ``ignore`` lists layers (or module
    prefixes) whose output channels / weights are never pruned. Structures that channel removal
    cannot handle correctly raise :class:`~autoprune.engine.units.SpaceError` naming the layer
    and the way out.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        granularity: str = "channel",
        max_ratio: float = 0.8,
        round_to: int = 1,
        nm_m: int = 4,
        classifier: str | None = None,
        ignore: Sequence[str] = (),
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
            self.layers, output = layer_geometry(model, example)
            self.classifier = find_classifier(model, self.layers, output, classifier)
            self.user_ignored = expand_ignore(model, ignore)
            self.ignored = self.user_ignored | {self.classifier}
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
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        modules = dict(model.named_modules())
        graph = trace(model, example)
        limit = largest_tensor(model, example)
        names = {id(m): n for n, m in modules.items()}
        params = {id(p): n for n, p in model.named_parameters()}
        ignored = [modules[n] for n in self.ignored]
        units: list[Unit] = []
        problems: dict[str, list[str]] = {}
        with index_limit(limit):
            found = list(dependency_groups(graph, ignored, names))
        for root_name, group in found:
            if isinstance(group, str):  # torch-pruning failed to map this layer's dependencies
                problems[root_name] = [group]
                continue
            members, issues, splits = group_members(group, names, params, modules)
            outs = [m.module for m in members if m.is_out and m.module in self.layers]
            if not outs:
                continue
            root = min(outs, key=order.__getitem__)
            unit = self._channel_unit(root, members)
            cells, why = unit_cells(unit, members, splits)
            issues += why
            if issues:
                problems[root] = issues
                continue
            unit.cells = cells
            units.append(unit)
        if problems:
            raise SpaceError(refusal(problems), units=list(problems))
        units.sort(key=lambda u: order[u.name])
        for i, u in enumerate(units):
            u.index = i
        return units

    def _channel_unit(self, root: str, members: list[Member]) -> Unit:
        geo = self.layers[root]
        shrunk = {m.module for m in members if m.is_out and m.module in self.layers}
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
            if geo.name in self.user_ignored:
                continue
            size = geo.out_channels * (geo.in_channels // geo.groups) * geo.kernel
            # N:M groups run along the reduction dimension, a transposed conv's is its weight's
            # first: not the layout N:M kernels take, so its weights stay dense (fixed cost)
            eligible = (geo.in_channels // geo.groups) % self.nm_m == 0 and not geo.transposed
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
        step = self._step
        if (step > 1).any():
            keep = np.rint(keep / step) * step
            keep = np.maximum(keep, np.ceil((sizes - most) / step) * step)
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
        vectors = _vector_holders(model)  # per-channel parameter holders: norms, layer scales
        n_l, n_u = len(names), len(self.units)
        self._a_in = np.zeros((n_l, n_u))
        self._a_out = np.zeros((n_l, n_u))
        self._a_bn = np.zeros((len(vectors), n_u))
        geo = [self.layers[n] for n in names]
        self._in = np.array([g.in_channels for g in geo], dtype=np.float64)
        self._out = np.array([g.out_channels for g in geo], dtype=np.float64)
        self._bn_total = np.array([c for c, _ in vectors.values()], dtype=np.float64)
        dw = np.array([g.kind == "dwconv" for g in geo])
        self._dw = dw
        self._mac_coef = np.array(
            [g.positions * g.kernel / (1 if g.kind == "dwconv" else g.groups) for g in geo]
        )
        self._w_coef = np.array([g.kernel / (1 if g.kind == "dwconv" else g.groups) for g in geo])
        self._bias = np.array([1.0 if g.bias else 0.0 for g in geo])
        self._bn_affine = np.array([per for _, per in vectors.values()], dtype=np.float64)
        self._layer_names = names
        self._bn_names = list(vectors)
        modeled_macs = float(sum(g.macs for g in geo))
        # Compute outside conv / linear modules (attention's projections and products, functional
        # convolutions, layers of other kinds): no unit prunes it, but it is part of the model's
        # cost, so every cost ratio counts it as fixed (issue: budgets reported met when they
        # were not). Measured by FlopCounterMode on the dense model, as the pruned one is.
        self.fixed_macs = max(0.0, float(measure_macs(model, self.input_shape)) - modeled_macs)
        self.dense_macs = modeled_macs + self.fixed_macs
        modeled = self._params_from(self._in, self._out, self._bn_total)
        self._other_params = self.total_params - modeled
        if self.granularity == "channel":
            self._fill_channel_maps(names, self._bn_names)
        else:
            self._unit_layer = np.array([names.index(u.name) for u in self.units])
        self.dense_params = float(self.total_params)
        self._step = self._rounding_steps()

    def _rounding_steps(self) -> np.ndarray:
        """Kept channels of a unit are a multiple of this: ``round_to``, and for units feeding
        grouped layers a multiple of their cell count (the lcm, where it divides the unit)."""
        steps = []
        for u in self.units:
            step = self.round_to
            if self.granularity == "channel" and u.cells is not None:
                step = math.lcm(self.round_to, u.n_cells)
                if u.size % step:
                    step = u.n_cells
            steps.append(step)
        return np.array(steps, dtype=np.float64)

    def _fill_channel_maps(self, names: list[str], vectors: list[str]) -> None:
        li = {n: i for i, n in enumerate(names)}
        vi = {n: i for i, n in enumerate(vectors)}
        for u in self.units:
            for m in u.members:
                # channels of the layer one removed root channel takes away: H*W behind a
                # flatten; a piece of a split (covering part of the unit, which loses the same
                # count in every piece) its share
                mult = len(m.idxs) / u.size
                if m.module in li:
                    if m.op in ("out", "dw"):
                        self._a_out[li[m.module], u.index] += mult
                    if m.op in ("in", "dw"):
                        self._a_in[li[m.module], u.index] += mult
                elif m.module in vi:
                    self._a_bn[vi[m.module], u.index] += mult

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
            macs = self.dense_macs - float(self._unit_macs() @ frac)  # fixed MACs included
            return macs, self.dense_params - float(removed.sum())
        kin = self._in - self._a_in @ removed
        kout = self._out - self._a_out @ removed
        kbn = self._bn_total - self._a_bn @ removed
        macs = float((self._mac_coef * np.where(self._dw, 1.0, kin) * kout).sum())
        return macs + self.fixed_macs, self._params_from(kin, kout, kbn) + self._other_params

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


def _vector_holders(model: nn.Module) -> dict[str, tuple[int, float]]:
    """Layers and bare parameters whose parameters are per channel: name -> (channels,
    parameters per channel). Norm layers by their channel count; a bare parameter (not owned
    by a conv / linear / norm layer) along its last non-singleton dimension, as torch-pruning
    cuts it."""
    out: dict[str, tuple[int, float]] = {}
    owned: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, (*LAYERS, *NORMS)):
            owned.update(id(p) for p in m.parameters(recurse=False))
        if isinstance(m, NORMS):
            n = norm_channels(m)
            params = sum(p.numel() for p in m.parameters(recurse=False))
            out[name] = (n, params / n)
    for name, p in model.named_parameters():
        if id(p) not in owned and p.dim() >= 1:
            dims = [d for d in range(p.dim()) if p.shape[d] > 1] or [p.dim() - 1]
            n = int(p.shape[dims[-1]])
            out[name] = (n, p.numel() / n)
    return out
