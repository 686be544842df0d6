"""Transposed convolutions (decoders, upsampling, U-Nets) are channel units like convolutions:
cut correctly on both sides, costed exactly, scored by their own output channels, tabulated for
latency budgets, masked by fine-grained pruning; grouped ones are refused.

References are independent of the engine: a hand-sliced network, the dense model with channels
zeroed (masking equivalence), torch's FlopCounterMode and the weights themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from structures import SHAPE, UNetTiny, randomize_norms
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.costs.table import LatencyTable
from autoprune.engine.criteria import CriterionContext, compute_scores
from autoprune.engine.equivalence import TOLERANCE, equivalence_error, verify_channel_pruning
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError

torch.set_num_threads(1)


class Decoder(nn.Module):
    """conv -> transposed conv (upsampling, bias) -> conv head: the simplest decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1)
        self.fc = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.up(F.relu(self.enc(x))))
        return self.fc(y.mean((2, 3)))


class Decoder1d(nn.Module):
    """A 1-D decoder on (2, 12) sequences: transposed conv, batch norm, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.up(F.relu(self.c1(x)))))
        y = F.relu(y + self.c2(y))
        return self.fc(y.mean(2))


class Decoder3d(nn.Module):
    """A 3-D decoder on (1, 4, 6, 6) volumes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.up(F.relu(self.c1(x))))
        return self.fc(y.mean((2, 3, 4)))


class GroupedUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.post = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.post(F.relu(self.up(F.relu(self.enc(x))))))
        return self.fc(y.mean((2, 3)))


def _ranking(space: PruningSpace, seed: int) -> Ranking:
    rng = np.random.default_rng(seed)
    return Ranking.from_scores(space, [rng.random(u.size) for u in space.units])


@pytest.mark.parametrize(
    ("cls", "shape"), [(UNetTiny, SHAPE), (Decoder1d, (2, 12)), (Decoder3d, (1, 4, 6, 6))]
)
def test_transposed_convolutions_are_units_cut_and_costed_exactly(cls, shape):
    torch.manual_seed(0)
    model = randomize_norms(cls()).eval()
    space = PruningSpace(model, shape, "channel")
    assert "up" in space.names  # a unit of its own, not a fixed cost
    assert space.fixed_macs == 0  # the analytic MACs of the dense model are FlopCounterMode's
    verify_channel_pruning(model, space)
    x = torch.randn(3, *shape)
    rng = np.random.default_rng(1)
    for seed in range(3):
        ratios = rng.uniform(0.2, space.max_ratio, len(space))
        ranking = _ranking(space, seed)
        pruned = prune_model(model, space, ranking, ratios)
        up = dict(pruned.named_modules())["up"]
        assert up.out_channels < dict(model.named_modules())["up"].out_channels
        assert equivalence_error(model, space, ranking, ratios, x, pruned) <= TOLERANCE
        macs, params = space.costs(ratios)
        assert measure_macs(pruned, shape) == pytest.approx(macs, rel=1e-9)
        assert count_params(pruned) == params


def test_transposed_conv_pruning_matches_a_hand_sliced_network():
    torch.manual_seed(0)
    model = Decoder().eval()
    space = PruningSpace(model, SHAPE, "channel")
    enc, up = space.unit("enc"), space.unit("up")
    scores = [np.array([4, 0, 5, 1, 6, 7], float), np.array([3, 4, 0, 5, 6], float)]
    assert [u.name for u in space.units] == ["enc", "up"]
    ratios = np.zeros(len(space))
    ratios[enc.index], ratios[up.index] = 2 / 6, 1 / 5  # enc loses 1 and 3, up loses 2
    pruned = prune_model(model, space, Ranking.from_scores(space, scores), ratios)
    keep_enc, keep_up = [0, 2, 4, 5], [0, 1, 3, 4]
    hand_enc = nn.Conv2d(1, 4, 3, stride=2, padding=1)
    hand_up = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
    hand_fc = nn.Linear(4, 10)
    with torch.no_grad():
        hand_enc.weight.copy_(model.enc.weight[keep_enc])
        hand_enc.bias.copy_(model.enc.bias[keep_enc])
        hand_up.weight.copy_(model.up.weight[keep_enc][:, keep_up])  # (in, out, kh, kw)
        hand_up.bias.copy_(model.up.bias[keep_up])
        hand_fc.weight.copy_(model.fc.weight[:, keep_up])
        hand_fc.bias.copy_(model.fc.bias)
        x = torch.randn(5, *SHAPE)
        hand = hand_fc(F.relu(hand_up(F.relu(hand_enc(x)))).mean((2, 3)))
        assert torch.allclose(pruned(x), hand, atol=1e-5)


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_filter_norms_score_a_transposed_convs_output_channels(name: str):
    torch.manual_seed(0)
    model = Decoder().eval()
    space = PruningSpace(model, SHAPE, "channel")
    ctx = CriterionContext(model, space, torch.randn(8, *SHAPE), torch.arange(8) % 10)
    scores = compute_scores(name, ctx)
    w = model.up.weight.detach()  # (in, out, kh, kw): output channel j is w[:, j]
    p = 1 if name == "l1" else 2
    expect = [float(w[:, j].norm(p)) for j in range(5)]
    assert scores[space.unit("up").index] == pytest.approx(expect, rel=1e-6)


def test_a_grouped_transposed_conv_is_refused_naming_its_unit():
    model = GroupedUp().eval()
    with pytest.raises(SpaceError, match="grouped transposed convolution") as err:
        PruningSpace(model, SHAPE, "channel")
    assert list(err.value.units) == ["enc"]  # the unit that feeds it (and is coupled to it)
    space = PruningSpace(model, SHAPE, "channel", ignore=["enc"])  # the way out
    assert space.names == ["post"]
    verify_channel_pruning(model, space)


def test_fine_grained_masks_transposed_weights_and_nm_leaves_them_dense():
    torch.manual_seed(0)
    model = randomize_norms(UNetTiny()).eval()
    fine = PruningSpace(model, SHAPE, "fine")
    assert {"up", "smooth"} <= set(fine.names)
    ratios = np.full(len(fine), 0.6)
    masked = prune_model(model, fine, _ranking(fine, 0), ratios)
    up = dict(masked.named_modules())["up"]
    zeros = int((up.weight == 0).sum())
    assert zeros == pytest.approx(0.6 * up.weight.numel(), abs=1)
    assert measure_macs(masked, SHAPE, nonzero_only=True) == pytest.approx(
        fine.costs(ratios)[0], rel=1e-9
    )
    nm = PruningSpace(model, SHAPE, "nm")
    assert "up" not in nm.names and "smooth" not in nm.names  # dense, a fixed cost
    assert nm.dense_macs == measure_macs(model, SHAPE)


def test_the_latency_table_times_transposed_convolutions(tmp_path: Path):
    torch.manual_seed(0)
    model = UNetTiny().eval()
    table = LatencyTable.build(model, SHAPE, grid=3, repeats=3, cache_dir=tmp_path)
    up, smooth = table.layers["up"], table.layers["smooth"]
    assert up.spec.kind == "tconv" and up.spec.output_padding == (1, 1) and up.spec.bn
    assert smooth.spec.depthwise and len(smooth.outs) == 1
    space = PruningSpace(model, SHAPE, "channel")
    ratios = np.full(len(space), 0.5)
    pruned = prune_model(model, space, _ranking(space, 0), ratios)
    channels = {n: c for n, c in space.layer_channels(ratios).items() if n in table.layers}
    assert table.predict_model(pruned) == pytest.approx(table.predict(channels))
    assert dict(pruned.named_modules())["up"].out_channels == channels["up"][1] < 12
    again = LatencyTable.build(model, SHAPE, grid=3, repeats=3, cache_dir=tmp_path)
    assert again == table  # cached, and the spec round-trips through JSON


def test_a_users_unet_is_searched_pruned_fine_tuned_and_reloaded(tmp_path: Path):
    from autoprune.agents import search

    from autoprune.apply import apply_policy, load_pruned, save_pruned
    from autoprune.policy import Policy
    from autoprune.task import task_from_module

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(160) % 10
    x = torch.randn(160, *SHAPE, generator=gen) + y[:, None, None, None] * 0.3
    torch.manual_seed(0)
    model = randomize_norms(UNetTiny()).eval()
    config = {"data": {"search_size": 48}, "eval": {"bn_batches": 2, "bn_batch_size": 32}}
    task = task_from_module(model, train=(x, y), test=(x[:64], y[:64]), config=config)
    assert {"up", "smooth"} & set(task.space.names)  # the decoder's layers are searched
    result = search("random", task, "flops=0.5", seed=0, evaluations=3)
    assert result.best is not None and result.best.flops_ratio <= 0.5 + 1e-9
    policy = Policy.from_task(task, result.best.ratios)
    applied = apply_policy(task, policy, finetune_epochs=1, latency=False)
    assert measure_macs(applied.model, SHAPE) <= 0.5 * measure_macs(model, SHAPE) * (1 + 1e-9)
    path = save_pruned(tmp_path / "unet.pt", task, applied.model, policy)
    loaded, _ = load_pruned(path, model=UNetTiny())
    probe = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(probe), applied.model.eval()(probe), atol=1e-5)


def test_reconstruction_is_refused_at_build_for_a_transposed_consumer():
    from autoprune.task import task_from_module

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, *SHAPE, generator=gen), torch.arange(80) % 10
    config = {"data": {"search_size": 32}, "reconstruct": True}
    with pytest.raises(ValueError, match=r"layers \['up'\] \(ConvTranspose2d\) lose input"):
        task_from_module(Decoder().eval(), train=(x, y), test=(x, y), config=config)
    # with the unit that feeds it kept out, nothing a policy cuts reaches it
    config["ignore"] = ["enc"]
    task = task_from_module(Decoder().eval(), train=(x, y), test=(x, y), config=config)
    assert task.space.names == ["up"]
