"""Each criterion removes the right channel / weight first on a layer built so the answer is known,
and reconstruction lowers the next layer's output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.engine.criteria import CRITERIA, CriterionContext, compute_scores, get_criterion
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.reconstruct import reconstruct
from autoprune.engine.space import PruningSpace

WEAK = 2  # the channel each crafted net makes least important


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def crafted(signal: str) -> Net:
    """A net whose channel WEAK of conv1 is least important by exactly one signal."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.conv1.weight.copy_(torch.randn(4, 1, 3, 3).sign() * 0.5)  # equal filter norms
        net.bn1.weight.fill_(1.0)
        net.bn1.bias.fill_(0.1)
        if signal == "norm":
            net.conv1.weight[WEAK] *= 0.05
        elif signal == "gamma":
            net.bn1.weight[WEAK] = 0.01
        elif signal == "dead":
            net.bn1.bias[WEAK] = -50.0  # never positive: always zero after ReLU
        elif signal == "unused":
            net.conv2.weight[:, WEAK] = 0.0  # nothing downstream reads it: zero gradient
    return net.eval()


def _context(net: Net, granularity: str = "channel") -> CriterionContext:
    space = PruningSpace(net, (1, 6, 6), granularity)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return CriterionContext(net, space, x, y)


@pytest.mark.parametrize(
    ("criterion", "signal"),
    [("l1", "norm"), ("l2", "norm"), ("bn_scale", "gamma"), ("apoz", "dead"),
     ("taylor", "unused"), ("hessian", "unused")],
)  # fmt: skip
def test_channel_criterion_picks_the_weak_channel(criterion: str, signal: str):
    ctx = _context(crafted(signal))
    scores = compute_scores(criterion, ctx)
    unit = ctx.space.unit("conv1").index
    assert int(np.argmin(scores[unit])) == WEAK
    ranking = Ranking.from_scores(ctx.space, scores)
    assert ranking.order[unit][0] == WEAK


def test_signals_are_specific():
    """A criterion must not be fooled by another criterion's signal (they measure different
    things): the filter norms of the 'gamma' net are all equal, so l1 sees no weak channel."""
    scores = compute_scores("l1", _context(crafted("gamma")))[0]
    assert np.allclose(scores, scores[0])


def test_random_criterion_is_seeded():
    ctx = _context(crafted("norm"))
    a = compute_scores("random", ctx)
    b = compute_scores("random", ctx)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "hessian"])
def test_fine_criteria_pick_the_weak_weight(criterion: str):
    net = crafted("none")
    with torch.no_grad():
        net.conv2.weight.fill_(0.3)
        if criterion == "magnitude":
            net.conv2.weight[1, 3, 1, 1] = 0.001
        else:  # input channel 3 of conv2 is always zero: its weights get no gradient at all
            net.conv1.weight[3] = 0.0
            net.bn1.bias[3] = -1.0
    ctx = _context(net, "fine")
    scores = compute_scores(criterion, ctx)[ctx.space.unit("conv2").index]
    weakest = np.unravel_index(int(np.argmin(scores)), scores.shape)
    if criterion == "magnitude":
        assert weakest == (1, 3, 1, 1)
    else:
        assert np.all(scores[:, 3] == 0) and np.all(np.delete(scores, 3, axis=1) > 0)


def test_criterion_errors():
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        get_criterion("l3", "channel")
    with pytest.raises(ValueError, match="does not apply to 'fine'"):
        get_criterion("bn_scale", "fine")
    assert {"l1", "l2", "bn_scale", "taylor", "hessian", "apoz", "random", "magnitude"} <= set(
        CRITERIA
    )


def test_reconstruction_lowers_next_layer_error():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # correlated channels make the refit meaningful
        net.conv1.weight[1] = net.conv1.weight[0] * 0.9 + 0.05 * torch.randn(1, 3, 3)
    space = PruningSpace(net, (1, 6, 6), "channel")
    ranking = Ranking.from_scores(space, [np.arange(u.size, dtype=float) for u in space.units])
    ratios = space.ratio_vector({"conv1": 0.5})
    x = torch.randn(256, 1, 6, 6)

    def error(model: nn.Module) -> float:
        out: list[torch.Tensor] = []
        h = model.conv2.register_forward_hook(lambda _m, _i, o: out.append(o))
        with torch.no_grad():
            model(x)
        h.remove()
        return float(out[0].sub(reference).pow(2).mean())

    reference_out: list[torch.Tensor] = []
    handle = net.conv2.register_forward_hook(lambda _m, _i, o: reference_out.append(o))
    with torch.no_grad():
        net(x)
    handle.remove()
    reference = reference_out[0]
    plain = prune_model(net, space, ranking, ratios)
    refit = prune_model(net, space, ranking, ratios)
    names = reconstruct(refit, net, space, x[:128], space.removed_counts(ratios).tolist())
    assert names == ["conv2"]
    assert error(refit) < 0.8 * error(plain)
