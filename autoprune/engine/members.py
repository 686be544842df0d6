"""Channel units from torch-pruning's dependency groups: the members (layers, bare parameters)
each group cuts with their index mappings, the cells of units that feed grouped layers or
splits, and the refusal of structures channel surgery cannot cut correctly.

A group comes from :func:`autoprune.engine.depgraph.dependency_groups`; what is cut is said in
:mod:`autoprune.engine.surgery`'s terms (``out`` / ``in`` / ``dw`` / ``ch`` / ``param``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn

from autoprune.engine.depgraph import split_sizes
from autoprune.engine.surgery import CONVS, NORMS, TRANSPOSED
from autoprune.engine.units import Member, Unit

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
    sizes = split_sizes(node.grad_fn)
    if sizes is None:
        return None
    offsets = np.cumsum(sizes)
    return np.searchsorted(offsets, np.asarray(item.idxs, dtype=np.int64), side="right")


def group_members(
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


def unit_cells(
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


def refusal(problems: dict[str, list[str]]) -> str:
    """One line: every refused unit with its reasons, and the way out."""
    listed = " | ".join(
        f"unit {root!r}: " + "; ".join(dict.fromkeys(why)) for root, why in problems.items()
    )
    return (
        f"channel pruning would not compute the pruned model correctly for {listed}. Keep these "
        f"units out of the search with ignore: {list(problems)}, or use granularity 'fine' or 'nm'"
    )
