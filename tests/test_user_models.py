"""Users' models that the built-in zoo does not exercise: frozen backbones, a shared PReLU slope,
and refusals that say what the pruned model raised.

The reference for channel pruning is masking equivalence (the dense model with the removed
channels zeroed, checked against a hand-pruned network in test_structures.py) and torch's own
MAC and parameter counts of the pruned model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from structures import randomize_norms
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.engine.criteria import CriterionContext, compute_scores
from autoprune.engine.equivalence import TOLERANCE, equivalence_error, verify_channel_pruning
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError

torch.set_num_threads(1)
SHAPE = (3, 12, 12)


class FrozenStemRes(nn.Module):
    """A residual block whose stem (feeding the skip add) is frozen, as in transfer learning."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bs = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.bm = nn.BatchNorm2d(8)
        self.tail = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)
        for p in [*self.stem.parameters(), *self.bs.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bs(self.stem(x)))
        y = F.relu(y + self.bm(self.mid(y)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.tail(y)), 1).flatten(1))


class SharedPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.a1 = nn.PReLU()  # one slope for every channel
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.a1(self.b1(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class ChannelBuffer(nn.Module):
    """A per-channel constant outside any layer: pruning c1 cannot cut it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(F.relu(self.c1(x)) * self.gain)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _check_pruning(model: nn.Module, space: PruningSpace) -> None:
    x = torch.randn(4, *SHAPE)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ratios = rng.uniform(0.2, space.max_ratio, len(space))
        ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
        pruned = prune_model(model, space, ranking, ratios)
        assert equivalence_error(model, space, ranking, ratios, x, pruned) <= TOLERANCE
        macs, params = space.costs(ratios)
        assert measure_macs(pruned, SHAPE) == pytest.approx(macs, rel=1e-9)
        assert count_params(pruned) == params


def test_frozen_layers_are_traced_and_pruned_like_trainable_ones():
    torch.manual_seed(0)
    model = randomize_norms(FrozenStemRes()).eval()
    space = PruningSpace(model, SHAPE, "channel")
    assert space.names == ["stem", "tail"]  # stem, mid and the skip add are one unit
    assert "mid" in {m.module for m in space.unit("stem").members}
    verify_channel_pruning(model, space)
    _check_pruning(model, space)
    assert not any(p.requires_grad for p in model.stem.parameters())  # flags untouched


def test_gradient_criteria_score_frozen_layers_and_give_the_flags_back():
    torch.manual_seed(0)
    model = randomize_norms(FrozenStemRes()).eval()
    space = PruningSpace(model, SHAPE, "fine")
    x, y = torch.randn(32, *SHAPE), torch.arange(32) % 5
    ctx = CriterionContext(model=model, space=space, x=x, y=y, batch_size=16)
    scores = dict(zip(space.names, compute_scores("taylor", ctx), strict=True))
    assert np.asarray(scores["stem"]).any()  # frozen: scored from its gradient, not all zero
    assert not model.stem.weight.requires_grad and model.mid.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_a_shared_prelu_slope_is_not_cut():
    torch.manual_seed(0)
    model = randomize_norms(SharedPReLU()).eval()
    space = PruningSpace(model, SHAPE, "channel")
    assert "a1" not in {m.module for u in space.units for m in u.members}
    verify_channel_pruning(model, space)
    _check_pruning(model, space)


def test_a_refusal_says_what_the_pruned_model_raised():
    torch.manual_seed(0)
    model = ChannelBuffer().eval()
    space = PruningSpace(model, SHAPE, "channel")
    with pytest.raises(SpaceError, match=r"units \['c1'\]; the pruned model raised RuntimeError"):
        verify_channel_pruning(model, space)
