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

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency.index_mapping import _SplitIndexMapping, update_index_mapping

from autoprune.costs.measure import measure_macs
from autoprune.engine.surgery import CONVS, LAYERS, NORMS, TRANSPOSED, norm_channels

GRANULARITIES = ("channel", "fine", "nm")
UNIT_KINDS = ("conv", "dwconv", "linear")


class SpaceError(ValueError):
    """A pruning space cannot be built or a policy does not fit it.

    ``units`` names the channel units refused as unsupported (their root layers, valid
    ``ignore`` entries), when the error is such a refusal; empty otherwise."""

    def __init__(self, message: str, units: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.units = tuple(units)


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


@dataclass
class Member:
    """One layer (or bare parameter) a channel unit cuts, and which of its indices per root channel.

    ``idxs[j]`` is removed whenever root channel ``root_idxs[j]`` is (torch-pruning's index
    mapping: identity for coupled convs, an offset after a concatenation, one-to-many for a
    flatten into a linear layer). ``op`` says what is cut (see :mod:`autoprune.engine.surgery`):
    ``out`` / ``in`` channels of a conv or linear layer, ``dw`` both of a depthwise conv, ``ch``
    a per-channel layer (norm, PReLU), ``param`` a bare parameter along ``pruning_dim``.
    ``group_size`` > 0 marks a grouped layer (grouped conv, GroupNorm) whose groups of that many
    channels must all lose the same number of channels.
    """

    module: str
    op: str
    idxs: np.ndarray
    root_idxs: np.ndarray
    pruning_dim: int = 0
    group_size: int = 0
    _identity: bool | None = field(default=None, repr=False, compare=False)

    @property
    def is_out(self) -> bool:
        """Whether the unit's channels are this layer's outputs (a producer, not a consumer)."""
        return self.op != "in"

    def indices_for(self, removed_roots: np.ndarray) -> list[int]:
        """The module's indices to remove when the unit removes ``removed_roots``."""
        n = len(self.idxs)
        if self._identity is None:
            span = np.arange(n)
            same = np.array_equal(self.idxs, span) and np.array_equal(self.root_idxs, span)
            self._identity = bool(same)
        if self._identity:  # the usual mapping, root channel j is channel j: no search needed
            return removed_roots[removed_roots < n].tolist()
        return np.unique(self.idxs[np.isin(self.root_idxs, removed_roots)]).tolist()


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
    cells: np.ndarray | None = field(default=None, repr=False)
    """Channel units feeding grouped layers: the cell of every root channel. Every cell loses
    the same number of channels, so every group of every grouped layer does (issue 13)."""

    @property
    def n_cells(self) -> int:
        return 1 if self.cells is None else int(self.cells.max()) + 1

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


def _geometry(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, LayerGeometry], Any]:
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


def _expand_ignore(model: nn.Module, ignore: Sequence[str]) -> set[str]:
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


def _trace(model: nn.Module, example: torch.Tensor) -> Any:
    """torch-pruning's dependency graph, with a tracing failure turned into a clear refusal.

    The tracer follows ``grad_fn``: the example requires grad so that layers whose parameters
    are frozen (``requires_grad=False``, a frozen backbone) are traced like the others, and it
    is passed as a one-element tuple so that the model is called on the batch, never on an
    unbatched sample."""
    example = example.detach().clone().requires_grad_(True)
    try:
        graph = tp.DependencyGraph().build_dependency(model, (example,), verbose=False)
    except Exception as exc:  # the tracer's own failures (e.g. ZeroDivisionError on shuffles)
        raise SpaceError(
            f"channel pruning cannot trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); use granularity 'fine' or 'nm', which need no "
            "tracing"
        ) from exc
    _fix_split_mappings(graph)
    return graph


def _split_sizes(grad_fn: Any) -> list[int] | None:
    """The sizes of the pieces a ``torch.split`` / ``chunk`` along the channels of a feature
    map (dim 1 of a tensor with positions: (N, C, L), (N, C, H, W), ...) cut, or None; splits
    of (N, features) tensors, as recurrent cells split their gates, are left to the library."""
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if getattr(grad_fn, "_saved_dim", None) != 1 or shape is None or len(shape) < 3:
        return None
    sizes = getattr(grad_fn, "_saved_split_sizes", None)
    if sizes is not None:
        return [int(v) for v in sizes]
    size = getattr(grad_fn, "_saved_split_size", None)
    if size is None:
        return None
    total, size = int(shape[1]), int(size)
    return [min(size, total - start) for start in range(0, total, size)]


def _fix_split_mappings(graph: Any) -> None:
    """Map each consumer of a ``torch.split`` / ``chunk`` along the channels to its own piece.

    torch-pruning 1.6.1 gives the i-th consumer it traced (in an order that follows the graph
    backwards from the output) the i-th piece, so a split whose second piece is traced first
    hands the two halves to the wrong consumers. Autograd records which piece each consumer
    reads (the output number of its edge to the split), and the offsets are set from that, in
    both directions. A split this cannot map exactly (a piece read through a path autograd
    does not show) keeps the library's mapping; the build-time equivalence check judges it."""
    split = tp.ops.OPTYPE.SPLIT
    nodes = [n for n in graph.module2node.values() if n.type == split and n.enable_index_mapping]
    nodes = [n for n in nodes if getattr(n.module, "offsets", None) is not None]  # along dim 1
    pieces = {id(n): _split_sizes(n.grad_fn) for n in nodes}
    equal = {id(n): p[0] for n in nodes if (p := pieces[id(n)]) and len(set(p)) == 1}
    if equal:  # a chunk's piece sizes, which the library infers wrongly from its consumers
        for node in nodes:
            if id(node) in equal:
                node.module.split_sizes = [equal[id(node)]] * len(node.outputs)
        for node in graph.module2node.values():  # concatenations of pieces: sizes again
            if node.type == tp.ops.OPTYPE.CONCAT:
                node.module.concat_sizes = None
        update_index_mapping(graph)
    for node in nodes:
        sizes = pieces[id(node)]
        if sizes is None:
            continue
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()

        def read_by(consumer: Any, grad_fn: Any = node.grad_fn) -> list[int]:
            fns = getattr(consumer.grad_fn, "next_functions", ())
            return [int(nr) for fn, nr in fns if fn is grad_fn]

        consumers = list(dict.fromkeys(node.outputs))
        read = {id(c): read_by(c) for c in consumers}
        if any(len(read[id(c)]) != node.outputs.count(c) for c in consumers):
            continue
        if any(nr >= len(sizes) for nrs in read.values() for nr in nrs):
            continue
        forward = node.dependencies[len(node.inputs) :]  # one per entry of node.outputs
        seen: dict[int, int] = {}
        for dep, out in zip(forward, node.outputs, strict=True):
            k = seen.get(id(out), 0)
            seen[id(out)] = k + 1
            nr = read[id(out)][k]
            dep.index_mapping[0] = _SplitIndexMapping(offsets[nr : nr + 2], reverse=False)
        for out in consumers:
            back = [
                d for d in out.dependencies[: len(out.inputs)] if d.target is node
            ]  # one per edge to the split, in the order of the consumer's inputs
            for dep, nr in zip(back, read[id(out)], strict=True):
                dep.index_mapping[0] = _SplitIndexMapping(offsets[nr : nr + 2], reverse=True)
        node.enable_index_mapping = False  # the library re-maps before every group otherwise


def _tolerant_reshape_mapping(update: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """torch-pruning 1.6.1's reshape mapping divides by a channel count it infers as 0 on some
    reshapes (ShuffleNetV2's channel shuffle), which fails the whole trace. Such a reshape is
    left unmapped instead: the units it touches are then mapped wrongly, which the build-time
    equivalence check refuses (``ignore_unsupported`` keeps the rest of the model searchable)."""
    if getattr(update, "autoprune_tolerant", False):
        return update

    def tolerant(graph: Any, node: Any) -> None:
        try:
            update(graph, node)
        except ZeroDivisionError:
            return

    tolerant.autoprune_tolerant = True  # type: ignore[attr-defined]
    return tolerant


_index_mapping.update_reshape_index_mapping = _tolerant_reshape_mapping(
    _index_mapping.update_reshape_index_mapping
)


class _Largest(TorchFunctionMode):
    """Records the largest tensor (elements per sample) any torch operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                self.numel = max(self.numel, t.numel() // max(1, int(t.shape[0])))
        return out


def _largest_tensor(model: nn.Module, example: torch.Tensor) -> int:
    """The number of elements per sample of the largest tensor in the model's forward pass."""
    mode = _Largest()
    with torch.no_grad(), mode:
        model(example)
    return max(mode.numel, int(example[0].numel()))


class _IndexOverflow(RuntimeError):
    """A flatten's index mapping reached channels that no tensor of the model has."""


_INDEX_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "autoprune_index_limit", default=None
)


@contextlib.contextmanager
def _index_limit(limit: int) -> Iterator[None]:
    token = _INDEX_LIMIT.set(limit)
    try:
        yield
    finally:
        _INDEX_LIMIT.reset(token)


def _bounded_flatten(call: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """torch-pruning 1.6.1 maps a channel through a flatten to ``stride`` indices, and on a
    model that flattens already flattened features (Swin's window partitions) it applies such
    mappings on top of each other: 1,024 indices become 33 million, and building one group
    passed 4 GB before the equivalence check could refuse it. An index past the
    largest tensor of the forward pass (per sample) cannot be a channel of the model, so such
    a mapping stops the group at once, and that unit is refused with the reason."""
    if getattr(call, "autoprune_bounded", False):
        return call

    def bounded(self: Any, idxs: Any) -> Any:
        limit = _INDEX_LIMIT.get()
        if limit is not None and not self.reverse and idxs:
            reach = (max(i.idx for i in idxs) + 1) * self._stride
            if reach > limit:
                raise _IndexOverflow(
                    f"a flatten maps its channels to index {reach - 1:,}, past the largest "
                    f"tensor of the forward pass ({limit:,} elements per sample)"
                )
        return call(self, idxs)

    bounded.autoprune_bounded = True  # type: ignore[attr-defined]
    return bounded


_index_mapping._FlattenIndexMapping.__call__ = _bounded_flatten(  # type: ignore[method-assign]
    _index_mapping._FlattenIndexMapping.__call__
)

_ROOTS = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)  # the layer types torch-pruning roots groups at


def _groups(graph: Any, ignored: Sequence[nn.Module], names: Mapping[int, str]) -> Iterator[Any]:
    """(root layer name, dependency group) of every prunable conv / linear layer in the graph,
    as torch-pruning's ``get_all_groups`` yields them, but one layer at a time: where the library
    fails to map one layer's dependencies (e.g. an ``IndexError`` on a recurrent layer), that
    layer comes with the reason (a string) instead of the whole model failing."""
    skip = {id(m) for m in [*ignored, *graph.IGNORED_LAYERS_IN_TRACING]}
    seen: set[int] = set()
    for module in list(graph.module2node):
        if id(module) in skip or id(module) in seen or not isinstance(module, _ROOTS):
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = None if pruner is None else pruner.get_out_channels(module)
        if channels is None:
            continue
        name = names.get(id(module), type(module).__name__)
        try:
            everything = list(range(channels))
            group = graph.get_pruning_group(module, pruner.prune_out_channels, everything)
        except Exception as exc:  # the library's own failure on a structure it does not handle
            seen.add(id(module))
            yield (
                name,
                (
                    f"torch-pruning cannot map its channel dependencies ({type(exc).__name__}: "
                    f"{str(exc)[:120]})"
                ),
            )
            continue
        keep = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                seen.add(id(dep.target.module))
                keep = keep and id(dep.target.module) not in skip
        if keep:
            yield name, group


_GROUPED_WHY = "(the same channels must be removed in every group)"


def _layer_cut(module: nn.Module, op: str) -> tuple[str, int] | str:
    """(surgery operation, group size) of a traced layer, or why it cannot be cut correctly."""
    if isinstance(module, (*CONVS, *TRANSPOSED)):
        g = module.groups
        if g == 1:
            return op, 0
        if g == module.in_channels == module.out_channels:
            return "dw", 0
        if isinstance(module, TRANSPOSED):
            return "grouped transposed convolution (only groups 1 and depthwise are cut)"
        if g == module.out_channels:
            return f"grouped conv with groups == out_channels != in_channels {_GROUPED_WHY}"
        size = (module.out_channels if op == "out" else module.in_channels) // g
        if size == 1:
            return f"grouped conv with one {op}put channel per group {_GROUPED_WHY}"
        return op, size
    if isinstance(module, nn.Linear):
        return op, 0
    if isinstance(module, nn.GroupNorm):
        size = module.num_channels // module.num_groups
        if size == 1:
            return "ch", 0
        return "ch", size
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return "LayerNorm over more than the channel dimension"
    if isinstance(module, NORMS):
        return "ch", 0
    return f"{type(module).__name__} layers are not supported by channel surgery"


def _pieces(item: Any) -> np.ndarray | None:
    """For a group item that reaches a split along the channels (``torch.chunk`` / ``split``):
    which piece each of its root channels falls in (indexed like ``item.root_idxs``)."""
    node = item.dep.target
    if node.type != tp.ops.OPTYPE.SPLIT or item.dep.handler.__name__ != "prune_out_channels":
        return None
    sizes = _split_sizes(node.grad_fn)
    if sizes is None:
        return None
    offsets = np.cumsum(sizes)
    return np.searchsorted(offsets, np.asarray(item.idxs, dtype=np.int64), side="right")


def _members(
    group: Any, names: Mapping[int, str], params: Mapping[int, str], modules: Mapping[str, Any]
) -> tuple[list[Member], list[str], list[np.ndarray]]:
    """The layers of one dependency group, merged per (layer, operation), any problems, and
    for each split the group's channels reach, the piece of every root channel of the unit
    (-1 where a root channel does not reach it)."""
    merged: dict[tuple[str, str], Member] = {}
    problems: list[str] = []
    reached: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # split -> (roots, pieces)
    for item in group.items:
        target = item.dep.target.module
        op = "out" if item.dep.handler.__name__ == "prune_out_channels" else "in"
        idxs = np.asarray(item.idxs, dtype=np.int64)
        roots = np.asarray(item.root_idxs, dtype=np.int64)
        pieces = _pieces(item)
        if pieces is not None:  # reached once per path (e.g. a piece read again by a concat)
            reached.setdefault(id(item.dep.target), []).append((roots, pieces))
            continue
        if isinstance(target, nn.Parameter) and id(target) in params:
            key = params[id(target)]
            cut: tuple[str, int] | str = ("param", 0)
        elif isinstance(target, nn.PReLU) and target.num_parameters == 1:
            continue  # one slope shared by every channel: nothing per channel to cut
        elif isinstance(target, nn.Module) and id(target) in names:
            key = names[id(target)]
            cut = _layer_cut(target, op)
        else:
            continue  # graph-only ops (add, concatenation, reshape): nothing to cut
        if isinstance(cut, str):
            problems.append(f"{key}: {cut}")
            continue
        member = Member(key, cut[0], idxs, roots, int(item.dep.target.pruning_dim), cut[1])
        old = merged.get((key, member.op))
        if old is not None:  # the same layer reached twice (a depthwise conv's in and out)
            pairs = np.unique(
                np.stack([np.r_[old.idxs, idxs], np.r_[old.root_idxs, roots]]), axis=1
            )
            old.idxs, old.root_idxs = pairs[0], pairs[1]
        else:
            merged[(key, member.op)] = member
    splits = []
    for paths in reached.values():
        roots = np.concatenate([r for r, _ in paths])
        label = np.full(int(roots.max()) + 1 if len(roots) else 0, -1, dtype=np.int64)
        label[roots] = np.concatenate([p for _, p in paths])
        splits.append(label)
    return list(merged.values()), problems, splits


def _cells(
    unit: Unit, members: list[Member], splits: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray | None, list[str]]:
    """Cells of a unit feeding grouped layers or split into pieces (``torch.chunk``): root
    channels that share a group in every grouped member and a piece in every split. Removing
    the same count from every cell keeps every group, and every piece, the same size (a chunk
    of the pruned tensor then cuts it where the pruned pieces meet)."""
    grouped = [m for m in members if m.group_size > 0]
    if not grouped and not splits:
        return None, []
    labels = np.zeros(unit.size, dtype=np.int64)
    problems = []
    for piece in splits:
        if len(piece) != unit.size or (piece < 0).any():
            problems.append("split into pieces that take only part of its channels")
            continue
        counts = np.bincount(piece)
        if (counts != counts[0]).any():
            problems.append(f"split into pieces of unequal sizes {counts.tolist()}")
            continue
        labels = labels * len(counts) + piece
    for m in grouped:
        one_to_one = len(np.unique(m.idxs)) == len(m.idxs) == len(np.unique(m.root_idxs))
        if not one_to_one or len(m.idxs) != unit.size:
            problems.append(f"{m.module}: grouped layer fed through a reshape or only in part")
            continue
        groups = m.idxs // m.group_size
        touched = np.unique(groups)
        if len(m.idxs) != len(touched) * m.group_size:
            problems.append(
                f"{m.module}: its groups mix channels of this unit and another one {_GROUPED_WHY}"
            )
            continue
        per_root = np.empty(unit.size, dtype=np.int64)
        per_root[m.root_idxs] = np.searchsorted(touched, groups)
        labels = labels * len(touched) + per_root
    if problems:
        return None, problems
    _, cells = np.unique(labels, return_inverse=True)
    counts = np.bincount(cells)
    if (counts != counts[0]).any():
        return None, [f"grouped layers {[m.module for m in grouped]} cut its channels unevenly"]
    return cells.astype(np.int64), []


def _refusal(problems: dict[str, list[str]]) -> str:
    """One line: every refused unit with its reasons, and the way out."""
    listed = " | ".join(
        f"unit {root!r}: " + "; ".join(dict.fromkeys(why)) for root, why in problems.items()
    )
    return (
        f"channel pruning would not compute the pruned model correctly for {listed}. Keep these "
        f"units out of the search with ignore: {list(problems)}, or use granularity 'fine' or 'nm'"
    )


class PruningSpace:
    """The units of a model for one granularity, and a vectorised analytic cost model.

    Build once per task: ``PruningSpace(model, input_shape, granularity)``. The model is traced
    with torch-pruning for channel granularity; the model itself is never modified.
    ``classifier`` names the layer whose outputs are the classes (default: found by output size,
    see :func:`find_classifier`); ``ignore`` lists layers (or module prefixes) whose output
    channels / weights are never pruned. Structures that channel removal cannot handle
    correctly raise :class:`SpaceError` naming the layer and the way out.
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
            self.layers, output = _geometry(model, example)
            self.classifier = find_classifier(model, self.layers, output, classifier)
            self.user_ignored = _expand_ignore(model, ignore)
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
        graph = _trace(model, example)
        limit = _largest_tensor(model, example)
        names = {id(m): n for n, m in modules.items()}
        params = {id(p): n for n, p in model.named_parameters()}
        ignored = [modules[n] for n in self.ignored]
        units: list[Unit] = []
        problems: dict[str, list[str]] = {}
        with _index_limit(limit):
            found = list(_groups(graph, ignored, names))
        for root_name, group in found:
            if isinstance(group, str):  # torch-pruning failed to map this layer's dependencies
                problems[root_name] = [group]
                continue
            members, issues, splits = _members(group, names, params, modules)
            outs = [m.module for m in members if m.is_out and m.module in self.layers]
            if not outs:
                continue
            root = min(outs, key=order.__getitem__)
            unit = self._channel_unit(root, members)
            cells, why = _cells(unit, members, splits)
            issues += why
            if issues:
                problems[root] = issues
                continue
            unit.cells = cells
            units.append(unit)
        if problems:
            raise SpaceError(_refusal(problems), units=list(problems))
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
