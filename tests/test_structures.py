"""Issue 13: channel pruning is correct on every structure real architectures contain, or refused.

The proof is masking equivalence: the physically pruned model computes, in eval mode, what the
dense model computes with the removed channels zeroed where they are produced (the reference
never uses the consumer-side index mapping pruning relies on). Exact MAC counts alone do not
catch a consumer cut at the wrong columns; this does.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from structures import PARTLY, REFUSED, SHAPE, STRUCTURES, randomize_norms
from torch import nn

from autoprune.costs.counting import count_params, measure_macs
from autoprune.engine.equivalence import (
    TOLERANCE,
    equivalence_error,
    masked_reference,
    verify_channel_pruning,
)
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError
from autoprune.models import MODELS, build_model, load_checkpoint

torch.set_num_threads(1)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = STRUCTURES[name]() if name in STRUCTURES else build_model(name, 1, 10)
    return randomize_norms(model).eval()


def _ranking(space: PruningSpace, rng: np.random.Generator) -> Ranking:
    return Ranking.from_scores(space, [rng.random(u.size) for u in space.units])


ALL = sorted(STRUCTURES) + sorted(MODELS)


@pytest.fixture(scope="module", params=ALL)
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module, PruningSpace]:
    model = _model(request.param)
    space = PruningSpace(model, SHAPE, "channel")
    verify_channel_pruning(model, space)
    return request.param, model, space


@pytest.mark.parametrize("level", [0.25, 0.5, 1.0])
def test_masking_equivalence_and_exact_costs(built, level: float):
    name, model, space = built
    rng = np.random.default_rng(int(level * 100))
    x = torch.randn(4, *SHAPE)
    for _ in range(3):
        ranking = _ranking(space, rng)
        ratios = rng.uniform(0, level * space.max_ratio, len(space))
        pruned = prune_model(model, space, ranking, ratios)
        assert equivalence_error(model, space, ranking, ratios, x, pruned) <= TOLERANCE, name
        macs, params = space.costs(ratios)
        assert measure_macs(pruned, SHAPE) == pytest.approx(macs, rel=1e-9), name
        assert count_params(pruned) == params, name


def test_pruned_model_trains_one_step(built):
    name, model, space = built
    rng = np.random.default_rng(3)
    pruned = prune_model(model, space, _ranking(space, rng), np.full(len(space), 0.5))
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    before = [p.detach().clone() for p in pruned.parameters()]
    loss = nn.functional.cross_entropy(pruned(torch.randn(8, *SHAPE)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), name
    assert any(not torch.equal(b, p) for b, p in zip(before, pruned.parameters(), strict=True))


def test_grouped_units_keep_every_group_equal():
    model = _model("resnext")
    space = PruningSpace(model, SHAPE, "channel")
    unit = space.unit("layer1.0.conv1.0")  # feeds the grouped conv layer1.0.conv2 (4 groups)
    assert unit.n_cells == 4
    rng = np.random.default_rng(0)
    for r in (0.1, 0.3, 0.55, 0.8):
        ratios = np.zeros(len(space))
        ratios[unit.index] = r
        pruned = prune_model(model, space, _ranking(space, rng), ratios)
        conv2 = dict(pruned.named_modules())["layer1.0.conv2.0"]
        assert conv2.groups == 4 and conv2.in_channels % 4 == 0
        assert conv2.in_channels == 16 - space.removed_counts(ratios)[unit.index]


def test_concatenation_consumer_is_cut_once_for_several_units():
    model = _model("inception")
    space = PruningSpace(model, SHAPE, "channel")
    feeders = [
        u for u in space.units if any(m.module == "inc2.b1.0" and m.op == "in" for m in u.members)
    ]
    assert len(feeders) == 3  # every branch of the first block feeds the second block's convs
    ratios = np.zeros(len(space))
    for u in feeders:
        ratios[u.index] = 0.5
    rng = np.random.default_rng(5)
    ranking = _ranking(space, rng)
    pruned = prune_model(model, space, ranking, ratios)
    assert equivalence_error(model, space, ranking, ratios, torch.randn(2, *SHAPE), pruned) < 1e-5
    conv = dict(pruned.named_modules())["inc2.b1.0"]
    assert conv.in_channels == 24 - sum(space.removed_counts(ratios)[u.index] for u in feeders)


# ------------------------------------------------------------ the reference itself
class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.bn(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_reference_matches_a_hand_pruned_network():
    """Independent of the engine: remove channels 1 and 4 of c1 by slicing weights by hand."""
    model = randomize_norms(_Chain()).eval()
    space = PruningSpace(model, SHAPE, "channel")
    unit = space.unit("c1")
    order = np.array([1, 4, 0, 2, 3, 5])  # least important first: channels 1 and 4 go
    scores = [np.argsort(order).astype(float) if u is unit else np.arange(u.size, dtype=float)
              for u in space.units]  # fmt: skip
    ranking = Ranking.from_scores(space, scores)
    removed = np.zeros(len(space), dtype=np.int64)
    removed[unit.index] = 2
    keep = [0, 2, 3, 5]
    hand = _Chain().eval()
    hand.c1 = nn.Conv2d(1, 4, 3, padding=1)
    hand.bn = nn.BatchNorm2d(4).eval()
    hand.c2 = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        hand.c1.weight.copy_(model.c1.weight[keep])
        hand.c1.bias.copy_(model.c1.bias[keep])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(hand.bn, attr).copy_(getattr(model.bn, attr)[keep])
        hand.c2.weight.copy_(model.c2.weight[:, keep])
        hand.c2.bias.copy_(model.c2.bias)
        hand.fc.load_state_dict(model.fc.state_dict())
        x = torch.randn(3, *SHAPE)
        ref = masked_reference(model, space, ranking, removed)(x)
        assert torch.allclose(ref, hand(x), atol=1e-5)
        ratios = removed / np.array([u.size for u in space.units])
        assert torch.allclose(prune_model(model, space, ranking, ratios)(x), hand(x), atol=1e-5)


def test_equivalence_catches_wrong_consumer_columns():
    """A consumer cut at the wrong columns keeps exact shapes and MACs; the check must fail."""
    model = _model("densenet")
    space = PruningSpace(model, SHAPE, "channel")
    rng = np.random.default_rng(0)
    ranking = _ranking(space, rng)
    ratios = np.full(len(space), 0.5)
    pruned = prune_model(model, space, ranking, ratios)
    conv = dict(pruned.named_modules())["trans"]
    with torch.no_grad():  # what replaying units one by one did: columns shifted by one
        conv.weight.copy_(torch.roll(conv.weight, 1, dims=1))
    assert equivalence_error(model, space, ranking, ratios, torch.randn(2, *SHAPE), pruned) > 0.01


def test_each_branch_of_a_chunk_reads_its_own_half_and_the_halves_lose_the_same_count():
    model = _model("split")  # conv1 -> chunk(2): the first half to `left`, the second to `right`
    space = PruningSpace(model, SHAPE, "channel")
    unit = space.unit("conv1.0")
    assert unit.n_cells == 2
    scores = [np.arange(u.size, dtype=float) + 1 for u in space.units]
    scores[unit.index][[2, 5, 9, 14]] = 0.0  # two of each half score lowest ...
    scores[unit.index][[3]] = 0.5  # ... and a third of the first half next
    ratios = np.zeros(len(space))
    ratios[unit.index] = 4 / 16
    pruned = prune_model(model, space, Ranking.from_scores(space, scores), ratios)
    layers = dict(pruned.named_modules())
    keep_left = [i for i in range(8) if i not in (2, 5)]  # not 3: each half loses two
    keep_right = [i - 8 for i in range(8, 16) if i not in (9, 14)]
    assert torch.equal(layers["left.0"].weight, model.left[0].weight[:, keep_left])
    assert torch.equal(layers["right.0"].weight, model.right[0].weight[:, keep_right])
    assert layers["conv1.0"].out_channels == 12


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_mistraced_structures_are_refused_with_the_way_out(name: str):
    model = randomize_norms(REFUSED[name]()).eval()
    with pytest.raises(SpaceError, match="ignore") as err:  # by the space or the check
        verify_channel_pruning(model, PruningSpace(model, SHAPE, "channel"))
    bad = str(err.value).split("ignore: ")[1].split("]")[0] + "]"
    units = [u.strip(" '[]") for u in bad.split(",")]
    assert units and units == list(err.value.units)
    fixed = PruningSpace(model, SHAPE, "channel", ignore=units)  # the way out works
    verify_channel_pruning(model, fixed)
    assert not set(units) & set(fixed.names)


def test_untraceable_model_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    """The tracer's own failure (ShuffleNetV2 makes it divide by zero) becomes one clear line."""
    import torch_pruning as tp

    def fails(*_args: object, **_kwargs: object) -> None:
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    with pytest.raises(SpaceError, match=r"cannot trace _Chain.*ZeroDivisionError.*'fine'"):
        PruningSpace(_Chain(), SHAPE, "channel")
    assert PruningSpace(_Chain(), SHAPE, "fine").names  # the way out needs no tracing


class _FlattenHead(nn.Module):
    """A VGG-style classifier: the last conv's channels reach the linear layer through a
    flatten, one channel to 16 features (4x4 positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(5 * 16, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.c1(x)))
        return self.fc2(torch.relu(self.fc1(torch.relu(x).flatten(1))))


def test_flatten_mapping_past_every_tensor_refuses_that_unit_only(
    monkeypatch: pytest.MonkeyPatch,
):
    """torch-pruning's flatten mappings, applied on top of each other (Swin), reach indices no
    tensor has and grow to gigabytes; past the largest tensor of the forward pass the
    unit is refused at once, and a real flatten (5 channels x 16 positions) is not."""
    import autoprune.engine.depgraph as depgraph
    import autoprune.engine.space as space_mod

    model = _FlattenHead().eval()
    assert depgraph.largest_tensor(model, torch.zeros(1, *SHAPE)) == 6 * 8 * 8  # c1's output
    space = PruningSpace(model, SHAPE, "channel")
    assert space.names == ["c1", "c2", "fc1"]
    verify_channel_pruning(model, space)
    # the same model, with the bound set below the flatten's 80 features: only c2 is refused
    monkeypatch.setattr(space_mod, "largest_tensor", lambda *_: 79)
    with pytest.raises(SpaceError, match=r"unit 'c2'.*_IndexOverflow.*index 79,.*79 elements"):
        PruningSpace(model, SHAPE, "channel")
    kept = PruningSpace(model, SHAPE, "channel", ignore=["c2"])
    assert kept.names == ["c1", "fc1"]
    verify_channel_pruning(model, kept)
    assert depgraph._INDEX_LIMIT.get() is None  # the bound holds only while a space is built


def test_grouped_conv_shared_by_two_units_is_refused():
    class TwoIntoGroups(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 3, 3, padding=1)
            self.b = nn.Conv2d(1, 5, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # group 0: 3 of a's, 1 of b's
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.g(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(y.mean((2, 3)))

    with pytest.raises(SpaceError, match=r"unit 'a': g: its groups mix.*ignore: \['a', 'b'\]"):
        PruningSpace(TwoIntoGroups(), SHAPE, "channel")
    space = PruningSpace(TwoIntoGroups(), SHAPE, "channel", ignore=["a", "b"])
    assert space.names == ["g"]


def test_a_library_failure_on_one_layer_is_a_refusal_of_that_unit():
    """torch-pruning's own IndexError on the layer feeding a GRU refuses that unit, with the way
    out, instead of failing the whole build; the conv branch beside it prunes correctly."""
    model = randomize_norms(PARTLY["recurrent"]()).eval()
    with pytest.raises(
        SpaceError, match=r"unit 'proj': torch-pruning cannot map.*IndexError.*ignore: \['proj'\]"
    ) as err:
        PruningSpace(model, SHAPE, "channel")
    assert err.value.units == ("proj",)
    space = PruningSpace(model, SHAPE, "channel", ignore=["proj"])
    assert space.names == ["conv.0"]
    verify_channel_pruning(model, space)


@pytest.mark.parametrize("arch", sorted(PARTLY))
def test_ignore_unsupported_prunes_the_rest_correctly_and_saves_it(arch: str, tmp_path: Path):
    from structures import build

    from autoprune import build_task
    from autoprune.apply import apply_policy, load_pruned, save_pruned
    from autoprune.policy import Policy

    torch.manual_seed(0)
    torch.save(build(arch=arch).state_dict(), tmp_path / "dense.pt")
    model = {"name": "structures:build", "kwargs": {"arch": arch}}
    model["checkpoint"] = str(tmp_path / "dense.pt")
    config = {"model": model, "data": {"resize": 16, "search_size": 64}, "seed": 1}
    with pytest.raises(SpaceError, match="ignore") as err:  # refused by default
        build_task(config)
    task = build_task({**config, "ignore_unsupported": True})
    assert task.skipped and set(err.value.units) <= set(task.skipped)
    assert task.units and not set(task.skipped) & set(task.units)
    assert task.config.ignore == task.skipped and task.fingerprint()["ignore"] == sorted(
        task.skipped
    )
    assert task.describe()["skipped_unsupported"] == task.skipped
    # the units kept are pruned correctly: against the dense model with those channels zeroed
    rng = np.random.default_rng(3)
    x = torch.randn(4, *SHAPE)
    for _ in range(3):
        ranking = _ranking(task.space, rng)
        ratios = rng.uniform(0.2, task.space.max_ratio, len(task.space))
        assert equivalence_error(task.model, task.space, ranking, ratios, x) <= TOLERANCE
    # the same space as naming the skipped units by hand; a saved model loads with its outputs
    assert build_task({**config, "ignore": task.skipped}).units == task.units
    policy = Policy.from_task(task, task.ratios_dict(np.full(len(task.space), 0.5)))
    result = apply_policy(task, policy, finetune_epochs=0, latency=False)
    loaded, _ = load_pruned(save_pruned(tmp_path / "pruned.pt", task, result.model, policy))
    xt = task.data.x_test[:8]
    assert torch.allclose(loaded.eval()(xt), result.model.eval()(xt), atol=1e-5)
    assert count_params(loaded) < count_params(task.model)


def test_ignore_unsupported_experiment_records_the_units_kept_out(tmp_path: Path):
    """MLflow records the config as built (the skipped units under ``ignore``), and a resume
    rebuilds the same space from it."""
    from structures import build

    from autoprune.runner.config import experiment_config
    from autoprune.runner.experiment import run_experiment
    from autoprune.tracking.reader import TrackingStore

    torch.save(build(arch="vit").state_dict(), tmp_path / "dense.pt")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = experiment_config(overrides=[
        "model.name=structures:build", "model.kwargs={arch: vit}",
        f"model.checkpoint={tmp_path / 'dense.pt'}", "data.resize=16", "data.search_size=64",
        "ignore_unsupported=true", "search.searchers=[random]", "search.evaluations=3",
        "search.workers=0", "search.budget=flops=0.9", f"tracking.uri={uri}",
    ])  # fmt: skip
    result = run_experiment(cfg)
    skipped = result.task.skipped
    assert skipped and TrackingStore(uri).config_of(result.parent_id)["ignore"] == skipped
    assert set(result.best.policy.ratios) == set(result.task.units)
    again = run_experiment(experiment_config(overrides=[f"tracking.uri={uri}"]),
                           resume=result.parent_id)  # fmt: skip
    assert again.task.units == result.task.units and again.task.config.ignore == skipped


def test_ignore_unsupported_says_when_nothing_is_left():
    class OnlyRecurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 12)
            self.gru = nn.GRU(12, 12, batch_first=True)
            self.fc = nn.Linear(12, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq, _ = self.gru(F.relu(self.proj(x.reshape(x.shape[0], 16, 16))))
            return self.fc(seq[:, -1])

    from autoprune.task import task_from_module

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, *SHAPE, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    with pytest.raises(SpaceError, match=r"no prunable units.*kept out the units \['proj'\]"):
        task_from_module(
            OnlyRecurrent(), train=(x, y), test=(x, y), search=(x, y),
            config={"ignore_unsupported": True},
        )  # fmt: skip


# ------------------------------------------------------------ classifier and ignore
def test_conv_classifier_is_found_by_output_size_or_named():
    model = _model("squeezenet")
    assert PruningSpace(model, SHAPE, "channel").classifier == "classifier.1"
    space = PruningSpace(model, SHAPE, "channel", classifier="features.3.expand3")
    assert "features.3.expand3" not in space.names
    with pytest.raises(SpaceError, match=r"classifier 'features\.9'"):
        PruningSpace(model, SHAPE, "channel", classifier="features.9")


def test_ignore_keeps_layers_out_by_name_or_prefix():
    model = build_model("resnet20", 1, 10)
    full = PruningSpace(model, SHAPE, "channel")
    space = PruningSpace(model, SHAPE, "channel", ignore=["layer3", "conv1"])
    assert not [n for n in space.names if n.startswith("layer3") or n == "conv1"]
    assert len(space) < len(full)
    fine = PruningSpace(model, SHAPE, "fine", ignore=["layer1"])
    assert not [n for n in fine.names if n.startswith("layer1")]
    with pytest.raises(SpaceError, match="'layer9' is not a module"):
        PruningSpace(model, SHAPE, "channel", ignore=["layer9"])


# ------------------------------------------------------------------ checkpoints
class _Versioned(nn.Module):
    """Like MNASNet: refuses a state dict without its version metadata."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise RuntimeError("checkpoint without version metadata")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_checkpoint_metadata_round_trips(tmp_path: Path):
    src = _Versioned()
    torch.save(src.state_dict(), tmp_path / "v.pt")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "wrapped.pt")
    for name in ("v.pt", "wrapped.pt"):
        dst = load_checkpoint(_Versioned(), tmp_path / name)
        assert torch.equal(dst.c.weight, src.c.weight)
    plain = OrderedDict(src.state_dict())  # no _metadata: the module must refuse it
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(RuntimeError, match="version metadata"):
        load_checkpoint(_Versioned(), tmp_path / "plain.pt")


# ------------------------------------------------------------------ whole tasks
@pytest.mark.parametrize("arch", sorted(STRUCTURES))
def test_apply_saves_a_model_that_loads_with_the_same_outputs(arch: str, tmp_path: Path):
    from structures import build

    from autoprune import build_task
    from autoprune.apply import apply_policy, load_pruned, save_pruned
    from autoprune.policy import Policy

    torch.manual_seed(0)
    torch.save(build(arch=arch).state_dict(), tmp_path / "dense.pt")
    model = {"name": "structures:build", "kwargs": {"arch": arch}}
    model["checkpoint"] = str(tmp_path / "dense.pt")
    task = build_task({"model": model, "data": {"resize": 16, "search_size": 64}, "seed": 1})
    ratios = np.random.default_rng(2).uniform(0.2, 0.7, len(task.space))
    policy = Policy.from_task(task, task.ratios_dict(ratios))
    result = apply_policy(task, policy, finetune_epochs=0, latency=False)
    x = task.data.x_test[:16]
    expected = result.model.eval()(x)
    loaded, again = load_pruned(save_pruned(tmp_path / "pruned.pt", task, result.model, policy))
    assert again.ratios == policy.ratios
    assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)
    assert count_params(loaded) < count_params(task.model)


def test_masked_norm_patch_stays_in_its_own_thread():
    import threading

    import torch.nn.functional as F

    from autoprune.engine.equivalence import _masked_functional

    original = F.layer_norm
    seen: list[torch.Tensor] = []
    x = torch.randn(2, 6)
    inside, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait()
        seen.append(F.layer_norm(x, (6,)))  # must be the real layer norm
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with _masked_functional("layer_norm", lambda *_a, **_k: torch.zeros(1)):
        assert F.layer_norm(x, (6,)).shape == (1,)
        inside.set()
        release.wait(10)
    worker.join()
    assert torch.allclose(seen[0], torch.nn.functional.layer_norm(x, (6,)))
    assert F.layer_norm is original


def test_task_build_refuses_a_mistraced_model_and_ignore_is_the_way_out(tmp_path: Path):
    from structures import build

    from autoprune import build_task

    torch.save(build(arch="gated").state_dict(), tmp_path / "w.pt")
    model = {"name": "structures:build", "kwargs": {"arch": "gated"}}
    model["checkpoint"] = str(tmp_path / "w.pt")
    config = {"model": model, "data": {"resize": 16, "search_size": 32}}
    with pytest.raises(SpaceError, match=r"units \['conv'\].*ignore: \['conv'\]"):
        build_task(config)
    task = build_task({**config, "ignore": ["conv"]})
    assert "conv" not in task.units and task.fingerprint()["ignore"] == ["conv"]
