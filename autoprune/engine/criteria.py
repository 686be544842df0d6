"""Importance criteria: which channels or weights a unit removes first (least important first).

Each criterion returns one score array per unit (higher = more important): per root channel for
channel granularity, per weight (same shape as the weight) for fine-grained and N:M. Scores are
computed once per task on the original model. Channel scores of a coupled group are summed over
its members through torch-pruning's index mapping, so a residual stage is judged as a whole.

Criteria (MIT 6.5940 pruning lectures):
- ``l1`` / ``l2``: filter norms (Li et al. 2017).
- ``bn_scale``: |gamma| of the batch-norm layers (network slimming, Liu et al. 2017).
- ``taylor``: first-order Taylor expansion of the loss, |sum(w * dL/dw)| (Molchanov et al.).
- ``hessian``: Optimal Brain Damage, 1/2 * w^2 * H_ii with the diagonal empirical Fisher E[g^2].
- ``apoz``: 1 - average percentage of zeros of post-ReLU activations (Hu et al. 2016).
- ``random``: a seeded random order (a sanity baseline).
- fine-grained / N:M: ``magnitude`` (|w|), ``taylor`` (|w * g|), ``hessian`` (as above).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.engine.space import PruningSpace
from autoprune.engine.surgery import LAYERS, out_major
from autoprune.engine.units import Member, Unit

Scores = list[np.ndarray]


@dataclass
class CriterionContext:
    """What a criterion may look at: the dense model, its space and a few labelled images."""

    model: nn.Module
    space: PruningSpace
    x: torch.Tensor
    y: torch.Tensor
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class Criterion:
    name: str
    granularities: tuple[str, ...]
    fn: Callable[[CriterionContext], Scores]
    description: str


CRITERIA: dict[str, Criterion] = {}


def register(name: str, granularities: tuple[str, ...], description: str) -> Callable:
    """Add a criterion to the registry (decorator)."""

    def wrap(fn: Callable[[CriterionContext], Scores]) -> Callable[[CriterionContext], Scores]:
        CRITERIA[name] = Criterion(name, granularities, fn, description)
        return fn

    return wrap


def get_criterion(name: str, granularity: str) -> Criterion:
    """Look a criterion up, with a clear error for an unknown name or granularity."""
    crit = CRITERIA.get(name)
    if crit is None:
        raise ValueError(f"unknown criterion {name!r}; choose from {sorted(CRITERIA)}")
    if granularity not in crit.granularities:
        ok = sorted(n for n, c in CRITERIA.items() if granularity in c.granularities)
        raise ValueError(
            f"criterion {name!r} does not apply to {granularity!r} pruning; choose from {ok}"
        )
    return crit


def compute_scores(name: str, ctx: CriterionContext) -> Scores:
    """Per-unit importance scores of criterion ``name``."""
    crit = get_criterion(name, ctx.space.granularity)
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        return [np.asarray(s, dtype=np.float64) for s in crit.fn(ctx)]
    finally:
        ctx.model.train(was_training)


# ------------------------------------------------------------------ helpers
def _modules(ctx: CriterionContext) -> dict[str, nn.Module]:
    return dict(ctx.model.named_modules())


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight_orig if hasattr(module, "weight_orig") else module.weight
    assert isinstance(w, torch.Tensor)
    return w.detach()


def _group_scores(
    ctx: CriterionContext,
    per_member: Callable[[Member, nn.Module], np.ndarray | None],
) -> Scores:
    """Sum a per-index score of each member into its unit's root channels."""
    modules = _modules(ctx)
    out = []
    for unit in ctx.space.units:
        total = np.zeros(unit.size)
        for m in unit.members:
            if m.module not in modules:
                continue  # a bare parameter (layer scale): no filter to score
            s = per_member(m, modules[m.module])
            if s is not None:
                np.add.at(total, m.root_idxs, s[m.idxs])
        out.append(total)
    return out


def _is_out_layer(m: Member, module: nn.Module) -> bool:
    return m.is_out and isinstance(module, LAYERS)


def _filter_reduce(t: torch.Tensor, how: str) -> np.ndarray:
    flat = t.reshape(t.shape[0], -1)
    if how == "l1":
        return flat.abs().sum(1).cpu().numpy()
    if how == "l2":
        return flat.pow(2).sum(1).sqrt().cpu().numpy()
    return flat.sum(1).cpu().numpy()


def _per_weight(ctx: CriterionContext, fn: Callable[[nn.Module], torch.Tensor]) -> Scores:
    modules = _modules(ctx)
    return [fn(modules[u.name]).cpu().numpy() for u in ctx.space.units]


def _batches(ctx: CriterionContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    device = next(ctx.model.parameters()).device
    n = len(ctx.x)
    return [
        (ctx.x[i : i + ctx.batch_size].to(device), ctx.y[i : i + ctx.batch_size].to(device))
        for i in range(0, n, ctx.batch_size)
    ]


def gradient_moments(ctx: CriterionContext) -> tuple[dict[str, torch.Tensor], ...]:
    """Mean gradient and mean squared gradient (empirical Fisher diagonal) of every conv/linear
    weight over mini-batches of the given images."""
    layers = {n: m for n, m in ctx.model.named_modules() if isinstance(m, LAYERS)}
    g1 = {n: torch.zeros_like(_weight(m)) for n, m in layers.items()}
    g2 = {n: torch.zeros_like(_weight(m)) for n, m in layers.items()}
    batches = _batches(ctx)
    weights = {}
    for n, m in layers.items():
        w = m.weight_orig if hasattr(m, "weight_orig") else m.weight
        assert isinstance(w, torch.Tensor)
        weights[n] = w
    # frozen layers (requires_grad=False) are scored too: their gradients are asked for while
    # the criterion runs, and the flags are given back afterwards
    frozen = [w for w in weights.values() if not w.requires_grad]
    for w in frozen:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            for xb, yb in batches:
                ctx.model.zero_grad(set_to_none=True)
                F.cross_entropy(ctx.model(xb), yb).backward()
                for n, w in weights.items():
                    if w.grad is not None:
                        g1[n] += w.grad / len(batches)
                        g2[n] += w.grad.pow(2) / len(batches)
    finally:
        ctx.model.zero_grad(set_to_none=True)
        for w in frozen:
            w.requires_grad_(False)
    return g1, g2


# -------------------------------------------------------- channel criteria
def _filters(mod: nn.Module) -> torch.Tensor:
    """A layer's weight with one row per output channel (a transposed conv's regrouped)."""
    return out_major(_weight(mod), mod)


@register("l1", ("channel",), "L1 norm of the filters (Li et al., ICLR 2017)")
def _l1(ctx: CriterionContext) -> Scores:
    return _group_scores(
        ctx, lambda m, mod: _filter_reduce(_filters(mod), "l1") if _is_out_layer(m, mod) else None
    )


@register("l2", ("channel",), "L2 norm of the filters")
def _l2(ctx: CriterionContext) -> Scores:
    return _group_scores(
        ctx, lambda m, mod: _filter_reduce(_filters(mod), "l2") if _is_out_layer(m, mod) else None
    )


@register("bn_scale", ("channel",), "|gamma| of batch norm (network slimming, Liu et al. 2017)")
def _bn_scale(ctx: CriterionContext) -> Scores:
    def score(m: Member, mod: nn.Module) -> np.ndarray | None:
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            return mod.weight.detach().abs().cpu().numpy()
        return None

    scores = _group_scores(ctx, score)
    if all(not s.any() for s in scores):
        raise ValueError("criterion 'bn_scale' needs batch-norm layers; the model has none")
    return scores


def _grad_channel(ctx: CriterionContext, kind: str) -> Scores:
    g1, g2 = gradient_moments(ctx)
    names = {id(m): n for n, m in ctx.model.named_modules()}

    def score(m: Member, mod: nn.Module) -> np.ndarray | None:
        if not _is_out_layer(m, mod):
            return None
        w, name = _weight(mod), names[id(mod)]
        if kind == "taylor":
            return np.abs(_filter_reduce(out_major(w * g1[name], mod), "sum"))
        return _filter_reduce(out_major(0.5 * w.pow(2) * g2[name], mod), "sum")

    return _group_scores(ctx, score)


@register("taylor", ("channel", "fine", "nm"), "first-order Taylor |w * dL/dw| (Molchanov et al.)")
def _taylor(ctx: CriterionContext) -> Scores:
    if ctx.space.granularity == "channel":
        return _grad_channel(ctx, "taylor")
    g1, _ = gradient_moments(ctx)
    return _per_weight(ctx, lambda mod: (_weight(mod) * g1[_name(ctx, mod)]).abs())


@register("hessian", ("channel", "fine", "nm"), "Optimal Brain Damage, 1/2 w^2 E[g^2] (LeCun 1990)")
def _hessian(ctx: CriterionContext) -> Scores:
    if ctx.space.granularity == "channel":
        return _grad_channel(ctx, "hessian")
    _, g2 = gradient_moments(ctx)
    return _per_weight(ctx, lambda mod: 0.5 * _weight(mod).pow(2) * g2[_name(ctx, mod)])


def _name(ctx: CriterionContext, module: nn.Module) -> str:
    for n, m in ctx.model.named_modules():
        if m is module:
            return n
    raise KeyError("module not in model")


@register("apoz", ("channel",), "1 - average percentage of zeros after ReLU (Hu et al. 2016)")
def _apoz(ctx: CriterionContext) -> Scores:
    """Activity of each channel: the share of positive pre-ReLU values of the group's batch-norm
    outputs (or, without batch norm, of its convs), i.e. 1 - APoZ of the post-ReLU activation."""
    modules = _modules(ctx)
    watched = {u.index: _activation_sources(u, modules) for u in ctx.space.units}
    positive: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(_mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            dims = [d for d in range(out.dim()) if d != 1]
            pos = (out > 0).float().sum(dim=dims)
            positive[name] = positive.get(name, 0) + pos  # type: ignore[assignment]
            count[name] = count.get(name, 0) + out.numel() // out.shape[1]

        return record

    for name in {n for members in watched.values() for n, _ in members}:
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for xb, _ in _batches(ctx):
                ctx.model(xb)
    finally:
        for h in hooks:
            h.remove()
    scores = []
    for unit in ctx.space.units:
        total = np.zeros(unit.size)
        for name, member in watched[unit.index]:
            frac = (positive[name] / max(1, count[name])).cpu().numpy()
            np.add.at(total, member.root_idxs, frac[member.idxs])
        scores.append(total / max(1, len(watched[unit.index])))
    return scores


def _activation_sources(unit: Unit, modules: dict[str, nn.Module]) -> list[tuple[str, Member]]:
    bns = [
        (m.module, m)
        for m in unit.members
        if isinstance(modules.get(m.module), nn.modules.batchnorm._BatchNorm)
    ]
    if bns:
        return bns
    return [
        (m.module, m)
        for m in unit.members
        if m.module in modules and _is_out_layer(m, modules[m.module])
    ]


@register("random", ("channel", "fine", "nm"), "a seeded random order (sanity baseline)")
def _random(ctx: CriterionContext) -> Scores:
    rng = np.random.default_rng(ctx.seed)
    if ctx.space.granularity == "channel":
        return [rng.random(u.size) for u in ctx.space.units]
    modules = _modules(ctx)
    return [rng.random(tuple(_weight(modules[u.name]).shape)) for u in ctx.space.units]


@register("magnitude", ("fine", "nm"), "|w| of each weight (Han et al. 2015)")
def _magnitude(ctx: CriterionContext) -> Scores:
    return _per_weight(ctx, lambda mod: _weight(mod).abs())
