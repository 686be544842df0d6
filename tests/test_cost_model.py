"""The cost model counts every MAC the model runs: 1-D and 3-D convolutions are units like 2-D
ones, a layer run twice costs twice, compute outside conv / linear modules (attention) is a fixed
cost, and a cost model that disagrees with the pruned model is refused at build time.

References are independent of the analytic model: hand-written MAC formulas, a hand-sliced
network, and torch's FlopCounterMode on the pruned model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from structures import randomize_norms
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.engine.equivalence import TOLERANCE, equivalence_error, verify_channel_pruning
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError

torch.set_num_threads(1)


class Seq1d(nn.Module):
    """A 1-D conv net on (2, 24) sequences with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 5, padding=2)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm1d(8)
        self.c3 = nn.Conv1d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(y + self.b2(self.c2(y)))
        return self.fc(F.adaptive_avg_pool1d(F.relu(self.c3(y)), 1).flatten(1))


class Vol3d(nn.Module):
    """A 3-D conv net on (1, 4, 8, 8) volumes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm3d(6)
        self.c2 = nn.Conv3d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc(F.adaptive_avg_pool3d(y, 1).flatten(1))


class Shared(nn.Module):
    """One conv applied twice (weight sharing, as in recurrent refinement blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.rec = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y = F.relu(self.rec(y))
        y = F.relu(self.rec(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Attn(nn.Module):
    """Patch embedding, one nn.MultiheadAttention block, a head: the attention's projections
    are not called as modules and its products run outside any layer."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + F.relu(self.mlp(t))
        return self.head(t.mean(1))


def _ranking(space: PruningSpace, seed: int) -> Ranking:
    rng = np.random.default_rng(seed)
    return Ranking.from_scores(space, [rng.random(u.size) for u in space.units])


@pytest.mark.parametrize(("cls", "shape"), [(Seq1d, (2, 24)), (Vol3d, (1, 4, 8, 8))])
def test_1d_and_3d_convolutions_are_channel_units_pruned_correctly(cls, shape):
    torch.manual_seed(0)
    model = randomize_norms(cls()).eval()
    space = PruningSpace(model, shape, "channel")
    cut = {m.module for u in space.units for m in u.members if m.is_out}
    assert {"c1", "c2"} <= cut  # the convolutions are pruned by units, not a fixed cost
    assert space.fixed_macs == 0
    verify_channel_pruning(model, space)
    x = torch.randn(3, *shape)
    rng = np.random.default_rng(1)
    for seed in range(3):
        ratios = rng.uniform(0.2, space.max_ratio, len(space))
        ranking = _ranking(space, seed)
        pruned = prune_model(model, space, ranking, ratios)
        assert equivalence_error(model, space, ranking, ratios, x, pruned) <= TOLERANCE
        macs, params = space.costs(ratios)
        assert measure_macs(pruned, shape) == pytest.approx(macs, rel=1e-9)
        assert count_params(pruned) == params


def test_conv1d_pruning_matches_a_hand_sliced_network():
    torch.manual_seed(0)
    model = randomize_norms(Seq1d()).eval()
    space = PruningSpace(model, (2, 24), "channel")
    unit = space.unit("c3")  # c3's outputs feed only fc
    scores = [np.array([5, 0, 6, 7, 1, 8, 9, 10, 11, 12, 13, 14], float) if u is unit
              else np.arange(u.size, dtype=float) for u in space.units]  # fmt: skip
    ratios = np.zeros(len(space))
    ratios[unit.index] = 2 / 12  # channels 1 and 4 score lowest
    pruned = prune_model(model, space, Ranking.from_scores(space, scores), ratios)
    keep = [i for i in range(12) if i not in (1, 4)]
    c3 = nn.Conv1d(8, 10, 3, stride=2, padding=1)
    fc = nn.Linear(10, 4)
    with torch.no_grad():
        c3.weight.copy_(model.c3.weight[keep])
        c3.bias.copy_(model.c3.bias[keep])
        fc.weight.copy_(model.fc.weight[:, keep])
        fc.bias.copy_(model.fc.bias)
        x = torch.randn(5, 2, 24)
        y = F.relu(model.b1(model.c1(x)))
        y = F.relu(y + model.b2(model.c2(y)))
        hand = fc(F.adaptive_avg_pool1d(F.relu(c3(y)), 1).flatten(1))
        assert torch.allclose(pruned(x), hand, atol=1e-5)


def test_conv1d_nm_masks_group_consecutive_input_channels():
    torch.manual_seed(0)
    model = Seq1d().eval()
    space = PruningSpace(model, (2, 24), "nm")
    assert "c2" in space.names and "c1" not in space.names  # c1 has 2 inputs, fewer than M = 4
    ratios = np.full(len(space), 0.5)
    rng = np.random.default_rng(0)
    modules = dict(model.named_modules())
    scores = [rng.random(tuple(modules[u.name].weight.shape)) for u in space.units]
    masked = prune_model(model, space, Ranking.from_scores(space, scores), ratios)
    w = masked.c2.weight.detach()  # (out, in, k): 2 of every 4 consecutive inputs are zero
    zeros = (w == 0).reshape(8, 2, 4, 3).sum(dim=2)
    assert (zeros == 2).all()
    assert measure_macs(masked, (2, 24), nonzero_only=True) == pytest.approx(
        space.costs(ratios)[0], rel=1e-9
    )


def test_a_layer_run_twice_costs_twice():
    torch.manual_seed(0)
    model = Shared().eval()
    space = PruningSpace(model, (1, 16, 16), "channel")  # stem and rec: one unit
    hand = 256 * 9 * (1 * 8 + 2 * 8 * 8) + 8 * 10  # stem, rec twice, fc
    assert space.dense_macs == hand
    ratios = np.full(len(space), 0.5)
    pruned = prune_model(model, space, _ranking(space, 0), ratios)
    assert measure_macs(pruned, (1, 16, 16)) == pytest.approx(space.costs(ratios)[0], rel=1e-9)


def test_attention_compute_is_a_fixed_cost_of_every_policy():
    torch.manual_seed(0)
    model = Attn().eval()
    t, e = 16, 16  # 16 patches of 16 features
    hand = t * 16 * e + t * e * 3 * e + 2 * t * t * e + t * e * e + t * e * e + e * 10
    assert measure_macs(model, (1, 16, 16)) == hand  # attention's fast path is not skipped
    space = PruningSpace(model, (1, 16, 16), "fine")
    assert space.dense_macs == hand
    assert space.fixed_macs == t * e * 3 * e + 2 * t * t * e + t * e * e
    ratios = np.full(len(space), 0.5)
    masked = prune_model(model, space, _ranking(space, 0), ratios)
    got = measure_macs(masked, (1, 16, 16), nonzero_only=True)
    assert got == pytest.approx(space.costs(ratios)[0], rel=1e-9)
    assert space.cost_ratios(ratios)["flops"] > 0.5  # half of the prunable half at most


def test_a_cost_model_that_misses_pruned_compute_is_refused(monkeypatch):
    torch.manual_seed(0)
    model = randomize_norms(Seq1d()).eval()
    space = PruningSpace(model, (2, 24), "channel")
    true_costs = space.costs
    index = space.unit("c3").index

    def blind(ratios: np.ndarray) -> tuple[float, float]:  # forgets what c3's pruning saves
        macs, params = true_costs(ratios)
        return macs + 1000.0 * bool(ratios[index] > 0), params

    monkeypatch.setattr(space, "costs", blind)
    refusal = r"cost model of Seq1d .* units \['c3'\].*ignore: \['c3'\]"
    with pytest.raises(SpaceError, match=refusal):
        verify_channel_pruning(model, space)


class Chain1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(F.relu(self.c1(x))).mean(2))


def test_reconstruction_refits_a_conv1d_consumer_by_least_squares():
    from autoprune.engine.reconstruct import reconstruct

    torch.manual_seed(0)
    net = Chain1d().eval()
    space = PruningSpace(net, (2, 16), "channel")
    ranking = Ranking.from_scores(space, [np.arange(u.size, dtype=float) for u in space.units])
    ratios = space.ratio_vector({"c1": 0.5})  # channels 0-2 of c1 go
    x = torch.randn(64, 2, 16)
    refit = prune_model(net, space, ranking, ratios)
    names = reconstruct(refit, net, space, x, space.removed_counts(ratios).tolist(), positions=16)
    assert names == ["c2"]
    # reference: ordinary least squares of c2's dense output on the kept inputs, every position
    with torch.no_grad():
        h = F.relu(net.c1(x))[:, 3:]  # (N, 3, L)
        cols = F.unfold(h.unsqueeze(2), (1, 3), padding=(0, 1))  # (N, 3 * 3, L)
        xs = cols.transpose(1, 2).reshape(-1, 9).double()
        ys = (net.c2(F.relu(net.c1(x))) - net.c2.bias[None, :, None]).transpose(1, 2)
        w = torch.linalg.lstsq(xs, ys.reshape(-1, 5).double()).solution.T.float()
        got = refit.c2.weight.reshape(5, 9)
        # sampled positions and a small ridge: close to, not equal to, the full solution; a
        # wrong (channel, tap) layout would be off by about the weights' own size
        assert float((got - w).norm() / w.norm()) < 0.1
        plain = prune_model(net, space, ranking, ratios)
        dense_out = net.c2(F.relu(net.c1(x)))
        err = lambda m: float((m.c2(F.relu(m.c1(x))) - dense_out).pow(2).mean())  # noqa: E731
        assert err(refit) < 0.8 * err(plain)


def test_reconstruction_refuses_a_conv3d_consumer_clearly():
    from autoprune.engine.reconstruct import reconstruct

    torch.manual_seed(0)
    net = Vol3d().eval()
    space = PruningSpace(net, (1, 4, 8, 8), "channel")
    ranking = Ranking.from_scores(space, [np.arange(u.size, dtype=float) for u in space.units])
    ratios = space.ratio_vector({"c1": 0.5})
    pruned = prune_model(net, space, ranking, ratios)
    with pytest.raises(ValueError, match="'c2' is a Conv3d: turn reconstruction off"):
        reconstruct(pruned, net, space, torch.randn(4, 1, 4, 8, 8))
