"""Masking equivalence: the proof that channel removal keeps the right weights (issue 13).

A physically pruned model must compute the same function, in eval mode, as the dense model in
which the removed channels are *zeroed where they are produced*: every layer that writes a
unit's channels (the convs / linears of a residual stage, their norms, depthwise convs, layer
scales) outputs zeros there, and the dense graph itself carries those zeros through adds,
concatenations, splits and reshapes to every consumer. The reference never uses the consumer-side
index mapping that pruning relies on, so a consumer cut at the wrong columns (a concatenation
replayed unit by unit, a grouped conv cut at shifted positions) shows up as a difference.

Norms that mix channels (LayerNorm, GroupNorm) compute their statistics over the kept channels
only in the reference, as the pruned layer does; batch norm in eval mode is per channel.

:func:`verify_channel_pruning` runs this check when a task is built, so a structure the engine
gets wrong is refused up front instead of being scored and saved.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.engine.pruning import Ranking, channels_to_remove, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.engine.surgery import norm_channels
from autoprune.engine.units import SpaceError

TOLERANCE = 1e-4  # max |pruned - reference| relative to 1 + max |reference| (float32)


def _zero_channels(dim: int, idxs: Sequence[int]) -> Callable[..., torch.Tensor]:
    index = torch.as_tensor(list(idxs), dtype=torch.long)

    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out.index_fill_(dim % out.dim(), index.to(out.device), 0.0)
        return out

    return hook


def _masked_layer_norm(keep: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``F.layer_norm`` over the last dimension with statistics over the kept channels only."""

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        mask = keep.to(x.device, x.dtype)
        n = mask.sum()
        mean = (x * mask).sum(-1, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / n
        y = (x - mean) / torch.sqrt(var + eps)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y * mask

    return layer_norm


def _masked_group_norm(keep: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``F.group_norm`` with statistics over the kept channels of each group only."""

    def group_norm(x, groups, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        n, c = x.shape[:2]
        tail = [1] * (x.dim() - 2)
        mask = keep.to(x.device, x.dtype).reshape(1, groups, -1, 1)
        xs = x.reshape(n, groups, c // groups, -1)
        count = mask.sum(2, keepdim=True) * xs.shape[-1]
        mean = (xs * mask).sum((2, 3), keepdim=True) / count
        var = (((xs - mean) * mask) ** 2).sum((2, 3), keepdim=True) / count
        y = ((xs - mean) / torch.sqrt(var + eps)).reshape(x.shape)
        if weight is not None:
            y = y * weight.reshape(1, -1, *tail)
        if bias is not None:
            y = y + bias.reshape(1, -1, *tail)
        return y * mask.reshape(1, c, *tail)

    return group_norm


_LOCAL = threading.local()  # this thread's masked norm functions, by name
_INSTALLED: dict[str, tuple[Callable[..., Any], int]] = {}  # name -> (original, users)
_LOCK = threading.Lock()


@contextmanager
def _masked_functional(name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """Within the block, *this thread's* calls of ``torch.nn.functional.<name>`` go to
    ``replacement``; other threads keep the original (a dispatcher is installed only while some
    thread is inside such a block)."""
    with _LOCK:
        original, users = _INSTALLED.get(name, (getattr(F, name), 0))
        if users == 0:

            def dispatch(*args: Any, **kwargs: Any) -> Any:
                fn = getattr(_LOCAL, name, None)
                return (fn or original)(*args, **kwargs)

            setattr(F, name, dispatch)
        _INSTALLED[name] = (original, users + 1)
    previous = getattr(_LOCAL, name, None)
    setattr(_LOCAL, name, replacement)
    try:
        yield
    finally:
        setattr(_LOCAL, name, previous)
        with _LOCK:
            original, users = _INSTALLED[name]
            if users == 1:
                setattr(F, name, original)
                del _INSTALLED[name]
            else:
                _INSTALLED[name] = (original, users - 1)


def _with_functional(module: nn.Module, name: str, replacement: Callable[..., Any]) -> None:
    """Run ``module``'s forward with ``torch.nn.functional.<name>`` replaced: norm layers (and
    subclasses that permute first, like a channels-first LayerNorm) all end in that call."""
    forward = module.forward

    def patched(*args: Any, **kwargs: Any) -> Any:
        with _masked_functional(name, replacement):
            return forward(*args, **kwargs)

    module.forward = patched  # type: ignore[method-assign]


def produced_channels(
    space: PruningSpace, ranking: Ranking, removed: np.ndarray
) -> dict[tuple[str, int], set[int]]:
    """(producer layer or parameter, dimension) -> channels it must output as zeros."""
    out: dict[tuple[str, int], set[int]] = {}
    for unit, count in zip(space.units, removed, strict=True):
        if count <= 0:
            continue
        roots = channels_to_remove(ranking, unit.index, int(count), space)
        for m in unit.members:
            if m.is_out:
                dim = m.pruning_dim if m.op == "param" else 0
                out.setdefault((m.module, dim), set()).update(m.indices_for(roots))
    return out


def masked_reference(
    model: nn.Module, space: PruningSpace, ranking: Ranking, removed: np.ndarray
) -> nn.Module:
    """A dense copy of ``model`` whose removed channels are zeroed where they are produced."""
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    params = dict(ref.named_parameters())
    for (name, dim), idxs in produced_channels(space, ranking, removed).items():
        if name in params and name not in modules:
            with torch.no_grad():
                params[name].index_fill_(dim, torch.as_tensor(sorted(idxs)), 0.0)
            continue
        module = modules[name]
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            keep = torch.ones(norm_channels(module))
            keep[sorted(idxs)] = 0
            if isinstance(module, nn.LayerNorm):
                _with_functional(module, "layer_norm", _masked_layer_norm(keep))
            else:
                _with_functional(module, "group_norm", _masked_group_norm(keep))
        else:  # conv, linear (last dim), batch / instance norm, PReLU: channels on dim 1
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            module.register_forward_hook(_zero_channels(channel_dim, sorted(idxs)))
    return ref


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def equivalence_error(
    model: nn.Module,
    space: PruningSpace,
    ranking: Ranking,
    ratios: np.ndarray,
    x: torch.Tensor,
    pruned: nn.Module | None = None,
) -> float:
    """Max |pruned(x) - reference(x)| / (1 + max |reference(x)|) for one policy."""
    if pruned is None:
        pruned = prune_model(model, space, ranking, ratios, light=True)
    removed = space.removed_counts(ratios)
    ref = _outputs(masked_reference(model, space, ranking, removed), x)
    got = _outputs(pruned, x)
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max() / (1 + ref.abs().max()))


def _probe(
    model: nn.Module,
    space: PruningSpace,
    ratios: np.ndarray,
    x: torch.Tensor,
    seed: int,
    failures: list[str] | None = None,
) -> float:
    """The equivalence error of one random pruning; a pruned model that cannot even run is
    infinitely wrong, and what it raised is appended to ``failures``."""
    rng = np.random.default_rng(seed)
    ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
    try:
        return equivalence_error(model, space, ranking, ratios, x)
    except Exception as exc:  # a shape mismatch inside the pruned model: certainly wrong
        if failures is not None:
            failures.append(f"{type(exc).__name__}: {exc}")
        return float("inf")


def verify_channel_pruning(model: nn.Module, space: PruningSpace, seed: int = 0) -> float:
    """Check masking equivalence on random channels of every unit at once; on a failure, find
    the units at fault and raise :class:`SpaceError` naming them and the way out. Returns the
    error seen. A cheap build-time guard: two pruned copies and a few forward passes."""
    if space.granularity != "channel":
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = torch.randn((1, *space.input_shape), generator=gen).to(device)  # one image, as tracing
    _outputs(model, x)  # the dense model's own failure is the user's error, not a refusal
    rng = np.random.default_rng(seed)
    ratios = rng.uniform(min(0.25, space.max_ratio / 2), space.max_ratio, len(space))
    failures: list[str] = []
    error = _probe(model, space, ratios, x, seed, failures)
    if error <= TOLERANCE:
        _verify_costs(model, space, ratios, seed)
        return error
    bad = []
    for u in space.units:
        alone = np.zeros(len(space))
        alone[u.index] = ratios[u.index]
        if _probe(model, space, alone, x, seed, failures) > TOLERANCE:
            bad.append(u.name)
    raised = f"; the pruned model raised {failures[0][:300]}" if failures else ""
    raise SpaceError(
        f"channel pruning of {type(model).__name__} does not compute the masked model (error "
        f"{error:.3g}) for units {bad or space.names}{raised}: the traced dependencies of these "
        f"layers are wrong (e.g. a channel shuffle, an unsupported reshape, or a per-channel "
        f"tensor outside the layers). Keep them out of the search with ignore: "
        f"{bad or space.names}, or use granularity 'fine' or 'nm'",
        units=bad or space.names,
    )


def _cost_gaps(
    model: nn.Module, space: PruningSpace, ratios: np.ndarray, seed: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((predicted, measured) MACs, (predicted, counted) params) of one pruned probe."""
    rng = np.random.default_rng(seed)
    ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
    pruned = prune_model(model, space, ranking, ratios, light=True)
    macs, params = space.costs(ratios)
    return (macs, float(measure_macs(pruned, space.input_shape))), (
        params,
        float(count_params(pruned)),
    )


def _off(pair: tuple[float, float]) -> bool:
    return abs(pair[0] - pair[1]) > 0.5 + 1e-9 * abs(pair[1])


def _verify_costs(model: nn.Module, space: PruningSpace, ratios: np.ndarray, seed: int) -> None:
    """The analytic cost model against the pruned probe's measured MACs and counted parameters:
    compute that pruning changes but no conv / linear module accounts for (a functional
    convolution or product of pruned features) would make budgets look met when they are not.
    On a gap, find the units at fault and raise :class:`SpaceError` naming them."""
    macs, params = _cost_gaps(model, space, ratios, seed)
    if not (_off(macs) or _off(params)):
        return
    bad = []
    for u in space.units:
        alone = np.zeros(len(space))
        alone[u.index] = ratios[u.index]
        if any(_off(pair) for pair in _cost_gaps(model, space, alone, seed)):
            bad.append(u.name)
    raise SpaceError(
        f"the cost model of {type(model).__name__} does not follow channel pruning of units "
        f"{bad or space.names}: it predicts {macs[0]:,.0f} MACs and {params[0]:,.0f} parameters "
        f"for a pruned probe that runs {macs[1]:,.0f} MACs with {params[1]:,.0f} parameters "
        f"(compute outside nn.Conv2d / nn.Linear modules that depends on these channels). Keep "
        f"them out of the search with ignore: {bad or space.names}, or use granularity 'fine' "
        f"or 'nm'",
        units=bad or space.names,
    )


__all__ = [
    "TOLERANCE",
    "equivalence_error",
    "masked_reference",
    "produced_channels",
    "verify_channel_pruning",
]
