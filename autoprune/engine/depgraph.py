"""Tracing and grouping with torch-pruning (DepGraph), and the patches torch-pruning 1.6.1 needs.

:func:`trace` builds the dependency graph of a model once per pruning space;
:func:`dependency_groups` yields its prunable groups one root layer at a time, inside
:func:`index_limit` (bounded by :func:`largest_tensor`). What each adaptation fixes, and why:

* **Frozen layers, unbatched calls** (:func:`trace`): the tracer follows ``grad_fn``, so the
  example requires grad (layers with ``requires_grad=False`` are traced like the others) and is
  passed as a one-element tuple (the model is called on the batch). A tracing failure becomes a
  :class:`~autoprune.engine.units.SpaceError` that names the way out (``fine`` / ``nm``).
* **Split / chunk mappings** (:func:`_fix_split_mappings`, after every trace): the library hands
  the i-th piece of a ``torch.split`` / ``chunk`` to the i-th consumer it traced, in backward
  order, so two halves can reach the wrong consumers; the offsets are re-set from autograd's
  edges, and a chunk's piece sizes from its saved split size.
* **Reshapes it cannot map** (:func:`_tolerant_reshape_mapping`, patched at import): the reshape
  mapping divides by a channel count inferred as 0 on a channel shuffle (ShuffleNetV2) and fails
  the whole trace; such a reshape is left unmapped, and the build-time equivalence check refuses
  the units it touches.
* **Flatten mappings that explode** (:func:`_bounded_flatten`, patched at import, active only
  inside :func:`index_limit`): flattens of already flattened features (Swin's window
  partitions) stack index mappings into tens of millions of indices; a mapping past the largest
  tensor of the forward pass stops that group with :class:`_IndexOverflow`.
* **One layer's failure is not the model's** (:func:`dependency_groups`): groups are built one
  root layer at a time, so a layer the library cannot map (an ``IndexError`` on a recurrent
  layer) comes back with the reason instead of failing every unit.

The two import-time patches replace functions of ``torch_pruning.dependency.index_mapping``
once (each is marked, so a re-import does not wrap it twice); importing this module, which
:mod:`autoprune.engine.space` does, applies them before any trace.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency.index_mapping import _SplitIndexMapping, update_index_mapping

from autoprune.engine.units import SpaceError


def trace(model: nn.Module, example: torch.Tensor) -> Any:
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


def split_sizes(grad_fn: Any) -> list[int] | None:
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
    pieces = {id(n): split_sizes(n.grad_fn) for n in nodes}
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


def largest_tensor(model: nn.Module, example: torch.Tensor) -> int:
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
def index_limit(limit: int) -> Iterator[None]:
    """Bound every flatten mapping to ``limit`` indices inside the block (see
    :func:`_bounded_flatten`); outside it, flatten mappings are the library's own."""
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


def dependency_groups(
    graph: Any, ignored: Sequence[nn.Module], names: Mapping[int, str]
) -> Iterator[Any]:
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
