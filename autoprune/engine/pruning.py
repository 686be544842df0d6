"""Apply a policy to a copy of a model: channel removal, fine-grained masks, N:M masks.

The input model is never mutated. Channel pruning physically removes channels with the
surgery of :mod:`autoprune.engine.surgery`, from the dependency groups recorded once in the
:class:`~autoprune.engine.space.PruningSpace` (no re-trace per policy): each layer is cut once,
with the union of every unit's channels in original indices. Fine-grained and N:M pruning
zero the least important weights of each unit; with ``persistent=True`` the zeros are kept by a
``torch.nn.utils.prune`` mask, so they stay zero while the model is fine-tuned.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from autoprune.engine import surgery
from autoprune.engine.space import PruningSpace


@dataclass
class Ranking:
    """Per-unit removal order derived once from importance scores (least important first).

    channel: ``order[u]`` lists root channels by ascending importance.
    fine: ``order[u]`` lists flat weight indices by ascending importance.
    nm: ``order[u]`` is each weight's rank inside its group of M along the input channels.
    """

    granularity: str
    order: list[np.ndarray]

    @classmethod
    def from_scores(cls, space: PruningSpace, scores: Sequence[np.ndarray]) -> Ranking:
        if len(scores) != len(space.units):
            raise ValueError(f"expected scores for {len(space.units)} units, got {len(scores)}")
        if space.granularity == "nm":
            order = [_nm_ranks(np.asarray(s), space.nm_m) for s in scores]
        else:
            order = [np.argsort(np.asarray(s).reshape(-1), kind="stable") for s in scores]
        return cls(space.granularity, order)


def _nm_layout(w: np.ndarray, m: int) -> np.ndarray:
    """(out, in, *kernel) or (out, in) -> groups of m consecutive input channels, shape (-1, m)."""
    if w.ndim > 2:
        w = np.moveaxis(w, 1, -1)
    return w.reshape(-1, m)


def _nm_unlayout(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) > 2:
        out, cin, *kernel = shape
        return np.moveaxis(flat.reshape(out, *kernel, cin), -1, 1)
    return flat.reshape(shape)


def _nm_ranks(scores: np.ndarray, m: int) -> np.ndarray:
    groups = _nm_layout(scores, m)
    ranks = np.argsort(np.argsort(groups, axis=1, kind="stable"), axis=1, kind="stable")
    return _nm_unlayout(ranks, scores.shape)


def light_copy(module: nn.Module) -> nn.Module:
    """A structural copy that shares parameter tensors but owns its buffers and bookkeeping.

    Much cheaper than ``copy.deepcopy`` (no weight copies, little Python overhead). Safe for the
    evaluator: pruning replaces parameters instead of writing into them, and batch-norm
    recalibration writes only buffers, which are cloned. Never train a light copy: an optimizer
    step would write into the shared weights of the original.
    """
    clone = module.__class__.__new__(module.__class__)
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    state["_buffers"] = {k: (b.clone() if b is not None else b) for k, b in module._buffers.items()}
    state["_modules"] = {
        k: (light_copy(m) if m is not None else None) for k, m in module._modules.items()
    }
    clone.__dict__.update(state)
    return clone


def prune_model(
    model: nn.Module,
    space: PruningSpace,
    ranking: Ranking,
    ratios: np.ndarray,
    persistent: bool = False,
    light: bool = False,
) -> nn.Module:
    """A pruned copy of ``model`` for a ratio vector (validated by ``space.ratio_vector``).

    ``light=True`` (the evaluator's hot path) shares unpruned weights with ``model`` through
    :func:`light_copy`; the copy must then not be trained.
    """
    if light and persistent:
        raise ValueError("a light copy cannot carry persistent masks: it must not be trained")
    pruned = light_copy(model) if light else copy.deepcopy(model)
    removed = space.removed_counts(ratios)
    if space.granularity == "channel":
        remove_channels(pruned, space, ranking, removed)
    else:
        apply_weight_masks(pruned, space, ranking, removed, persistent)
    return pruned


def channels_to_remove(ranking: Ranking, unit: int, count: int, space: PruningSpace) -> np.ndarray:
    """The ``count`` least important root channels of a unit, sorted. A unit feeding grouped
    layers loses ``count / cells`` channels in every cell: the least important of each cell
    (importance summed over the coupled layers), so every group keeps the same width."""
    order = ranking.order[unit]
    cells = space.units[unit].cells
    if cells is None:
        return np.sort(order[:count])
    n = space.units[unit].n_cells
    if count % n:
        raise ValueError(
            f"unit {space.units[unit].name!r}: {count} channels is not a multiple of its {n} groups"
        )
    ranked_cells = cells[order]
    picks = [order[ranked_cells == c][: count // n] for c in range(n)]
    return np.sort(np.concatenate(picks))


def channel_cuts(
    space: PruningSpace, ranking: Ranking, removed: np.ndarray
) -> dict[tuple[str, str, int], list[int]]:
    """Which original indices to cut from which layer: (layer, operation, dimension of a bare
    parameter) -> indices, the union over every unit that reaches the layer (a concatenation's
    consumer is cut once)."""
    cuts: dict[tuple[str, str, int], set[int]] = {}
    for unit, count in zip(space.units, removed, strict=True):
        if count <= 0:
            continue
        roots = channels_to_remove(ranking, unit.index, int(count), space)
        for member in unit.members:
            dim = member.pruning_dim if member.op == "param" else 0
            key = (member.module, member.op, dim)
            cuts.setdefault(key, set()).update(member.indices_for(roots))
    return {key: sorted(idxs) for key, idxs in cuts.items()}


def remove_channels(
    model: nn.Module, space: PruningSpace, ranking: Ranking, removed: np.ndarray
) -> None:
    """Physically remove channels in place: each layer cut once, in original indices."""
    modules = dict(model.named_modules())
    for (name, op, dim), idxs in channel_cuts(space, ranking, removed).items():
        if op == "param":
            owner, _, attr = name.rpartition(".")
            surgery.parameter(modules[owner], attr, dim, idxs)
        else:
            surgery.cut(modules[name], op, idxs)


def weight_masks(
    space: PruningSpace, ranking: Ranking, removed: np.ndarray, shapes: Sequence[torch.Size]
) -> list[np.ndarray]:
    """Boolean keep-masks of every unit's weight (fine: global order; nm: per group of M)."""
    masks = []
    for unit, count, shape in zip(space.units, removed, shapes, strict=True):
        order = ranking.order[unit.index]
        if space.granularity == "nm":
            drop = round(count / unit.size * space.nm_m)  # weights dropped per group
            masks.append(order >= drop)
        else:
            keep = np.ones(unit.size, dtype=bool)
            keep[order[: int(count)]] = False
            masks.append(keep.reshape(tuple(shape)))
    return masks


def apply_weight_masks(
    model: nn.Module,
    space: PruningSpace,
    ranking: Ranking,
    removed: np.ndarray,
    persistent: bool = False,
) -> None:
    """Zero the least important weights of each unit in place (masks kept if ``persistent``)."""
    modules = dict(model.named_modules())
    layers = [modules[u.name] for u in space.units]
    shapes = [_weight(m).shape for m in layers]
    for layer, mask in zip(layers, weight_masks(space, ranking, removed, shapes), strict=True):
        keep = torch.as_tensor(mask, device=_weight(layer).device)
        if persistent:
            torch_prune.custom_from_mask(layer, "weight", keep)
        else:  # a new tensor, never in place: the weight may be shared (light_copy)
            layer.weight = nn.Parameter(layer.weight.detach() * keep)  # type: ignore[operator]


def _weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
    assert isinstance(w, torch.Tensor)
    return w


def make_masks_permanent(model: nn.Module) -> nn.Module:
    """Fold ``torch.nn.utils.prune`` masks into plain weights (for saving and deployment)."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
    return model


def ramp(target: np.ndarray, steps: int, schedule: str = "cubic") -> list[np.ndarray]:
    """Ratios of an iterative prune / fine-tune schedule that ramps to ``target`` in ``steps``.

    ``cubic`` follows Zhu & Gupta (2017): prune fast while redundancy is high, slowly near the
    end; ``linear`` takes equal steps. The last step is exactly the target.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fractions = []
    for k in range(1, steps + 1):
        t = k / steps
        fractions.append(1 - (1 - t) ** 3 if schedule == "cubic" else t)
    if schedule not in ("cubic", "linear"):
        raise ValueError(f"unknown schedule {schedule!r}; choose cubic or linear")
    return [np.asarray(target, dtype=np.float64) * f for f in fractions]
