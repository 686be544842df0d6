"""Pruning space, channel removal and masks on every zoo model: costs agree, nothing leaks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.engine.pruning import Ranking, light_copy, prune_model, ramp
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError
from autoprune.models import MODELS, build_model

ZOO = sorted(MODELS)
SHAPE = (1, 8, 8)


def _random_ranking(space: PruningSpace, model: nn.Module, seed: int = 0) -> Ranking:
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    if space.granularity == "channel":
        return Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
    shapes = [tuple(modules[u.name].weight.shape) for u in space.units]
    return Ranking.from_scores(space, [rng.random(s) for s in shapes])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=ZOO)
def zoo_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, build_model(request.param, 1, 10).eval()


@pytest.mark.parametrize("light", [False, True])
def test_channel_pruning_matches_analytic_costs(zoo_model: tuple[str, nn.Module], light: bool):
    name, model = zoo_model
    space = PruningSpace(model, SHAPE, "channel")
    ranking = _random_ranking(space, model)
    before = _snapshot(model)
    rng = np.random.default_rng(1)
    for _ in range(3):
        ratios = rng.uniform(0, space.max_ratio, len(space))
        pruned = prune_model(model, space, ranking, ratios, light=light)
        out = pruned(torch.randn(2, *SHAPE))
        assert out.shape == (2, 10)
        macs, params = space.costs(ratios)
        measured = measure_macs(pruned, SHAPE)
        assert abs(measured - macs) <= 0.01 * measured, name
        assert count_params(pruned) == params, name
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model changed"


def test_channel_units_group_coupled_layers():
    model = build_model("resnet20", 1, 10)
    space = PruningSpace(model, SHAPE, "channel")
    # A residual stage is one unit: the stem and every block's second conv share channels.
    stem = space.unit("conv1")
    members = {m.module for m in stem.members if m.is_out}
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= members
    assert "fc" not in space.names  # the classifier is never a unit
    assert space.names == sorted(space.names, key=list(dict(model.named_modules())).index)


def test_removed_counts_round_to_multiples():
    model = build_model("resnet20", 1, 10)
    space = PruningSpace(model, SHAPE, "channel", round_to=4)
    removed = space.removed_counts(np.full(len(space), 0.33))
    kept = np.array([u.size for u in space.units]) - removed
    assert (kept % 4 == 0).all() and (kept >= 4).all()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg11"])
def test_fine_grained_sparsity_is_exact(name: str):
    model = build_model(name, 1, 10).eval()
    space = PruningSpace(model, SHAPE, "fine")
    ratios = np.random.default_rng(0).uniform(0, 0.8, len(space))
    pruned = prune_model(model, space, _random_ranking(space, model), ratios)
    modules = dict(pruned.named_modules())
    for unit, r in zip(space.units, ratios, strict=True):
        w = modules[unit.name].weight
        assert int((w == 0).sum()) == round(r * unit.size), unit.name
    macs, _ = space.costs(ratios)
    assert abs(measure_macs(pruned, SHAPE, nonzero_only=True) - macs) <= 0.01 * macs


@pytest.mark.parametrize("m", [4, 8])
def test_nm_pattern_holds_in_every_group(m: int):
    model = build_model("resnet20", 1, 10).eval()
    space = PruningSpace(model, SHAPE, "nm", nm_m=m)
    ratios = np.random.default_rng(0).uniform(0, 0.8, len(space))
    pruned = prune_model(model, space, _random_ranking(space, model), ratios)
    modules = dict(pruned.named_modules())
    for unit, r in zip(space.units, ratios, strict=True):
        w = modules[unit.name].weight.detach()
        groups = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(-1, m)
        n_keep = int(np.clip(m - np.rint(r * m), 1, m))
        assert ((groups != 0).sum(1) <= n_keep).all(), unit.name
        assert int((groups == 0).sum()) == groups.shape[0] * (m - n_keep)
    assert "conv1" not in space.names  # one input channel: no group of M along it


def test_persistent_masks_survive_training():
    model = build_model("resnet20", 1, 10)
    space = PruningSpace(model, SHAPE, "fine")
    pruned = prune_model(
        model, space, _random_ranking(space, model), np.full(len(space), 0.5), persistent=True
    )
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned.train()
    for _ in range(3):
        opt.zero_grad()
        pruned(torch.randn(8, *SHAPE)).sum().backward()
        opt.step()
    w = dict(pruned.named_modules())["layer1.0.conv1"].weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


def test_light_copy_owns_buffers_and_shares_weights():
    model = build_model("resnet20", 1, 10).eval()
    clone = light_copy(model)
    assert clone.conv1.weight is model.conv1.weight
    clone.bn1.running_mean.add_(1.0)
    assert not torch.equal(clone.bn1.running_mean, model.bn1.running_mean)
    clone.register_forward_hook(lambda *_: None)
    assert not model._forward_hooks


def test_ratio_validation_errors():
    model = build_model("resnet20", 1, 10)
    space = PruningSpace(model, SHAPE, "channel", max_ratio=0.8)
    with pytest.raises(SpaceError, match="outside"):
        space.ratio_vector({"conv1": 0.9})
    with pytest.raises(SpaceError, match="unknown unit 'conv9'"):
        space.ratio_vector({"conv9": 0.1})
    with pytest.raises(SpaceError, match="expected 12 ratios"):
        space.ratio_vector([0.1, 0.2])
    with pytest.raises(SpaceError, match="granularity"):
        PruningSpace(model, SHAPE, "block")


def test_ramp_schedule():
    target = np.array([0.2, 0.8])
    steps = ramp(target, 3)
    assert np.allclose(steps[-1], target)
    assert all((a <= b).all() for a, b in itertools.pairwise(steps))
    assert np.allclose(ramp(target, 2, "linear")[0], target / 2)
    with pytest.raises(ValueError):
        ramp(target, 0)
