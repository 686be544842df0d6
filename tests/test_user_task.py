"""Issue 14: a task from the user's own nn.Module and data (tensors, Datasets, DataLoaders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from autoprune.agents import SearchError, search
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune import Evaluator
from autoprune.apply import apply_policy, load_pruned, save_pruned
from autoprune.data import DataError
from autoprune.task import task_from_module

SHAPE = (1, 12, 10)  # not square


class SmallNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, *SHAPE, generator=gen) + y[:, None, None, None] * 0.7
    return x, y


def _trained() -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet()
    x, y = _data(256, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def top1_percent(model: nn.Module, batches) -> float:
    """A custom metric: accuracy in percent, computed independently of autoprune."""
    hits = total = 0
    for x, y in batches:
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


CONFIG = {"data": {"search_size": 64}, "eval": {"bn_batches": 2, "bn_batch_size": 32}}


def _loader_task(metric=None):
    train, search_data, test = _data(256, 1), _data(96, 2), _data(96, 3)
    return task_from_module(
        _trained(),
        train=DataLoader(TensorDataset(*train), batch_size=32, shuffle=True),
        search=DataLoader(TensorDataset(*search_data), batch_size=48),
        test=DataLoader(TensorDataset(*test), batch_size=48),
        metric=metric,
        config=CONFIG,
    )


def test_user_module_and_loaders_search_apply_reload(tmp_path: Path):
    task = _loader_task(metric=top1_percent)
    assert task.input_shape == SHAPE and task.data.num_classes == 4
    result = search("random", task, "flops=0.6", seed=0, evaluations=4)
    best = result.best
    assert best.flops_ratio <= 0.6 + 1e-9
    pruned = task.prune(best.ratios)
    task.recalibrate(pruned)
    batches = task.data.batches("search", 48)
    assert best.accuracy == pytest.approx(top1_percent(pruned, batches))  # the metric is used
    from autoprune.policy import Policy

    policy = Policy.from_task(task, best.ratios)
    applied = apply_policy(task, policy, finetune_epochs=1, latency=False)
    x = _data(8, 9)[0]
    expected = applied.model.eval()(x)
    path = save_pruned(tmp_path / "pruned.pt", task, applied.model, policy)
    with pytest.raises(ValueError, match="pass a dense instance"):
        load_pruned(path)
    loaded, _ = load_pruned(path, model=SmallNet())
    assert torch.allclose(loaded(x), expected, atol=1e-5)

    class Other(nn.Module):  # another architecture, same output width
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match="the model given, Other, is not that architecture"):
        load_pruned(path, model=Other())
    assert applied.after["test_accuracy"] > 25.0  # percent: the metric, above chance


def test_streamed_dataset_scores_like_in_memory_tensors():
    train, test = _data(256, 1), _data(96, 3)
    in_memory = task_from_module(_trained(), train=train, test=test, config=CONFIG)
    streamed = task_from_module(
        _trained(), train=TensorDataset(*train), test=TensorDataset(*test), config=CONFIG
    )
    assert not streamed.data.in_memory and in_memory.data.in_memory
    ratios = np.full(len(in_memory.space), 0.4)
    a, b = Evaluator(in_memory).evaluate(ratios), Evaluator(streamed).evaluate(ratios)
    assert a.accuracy == pytest.approx(b.accuracy) and a.loss == pytest.approx(b.loss, rel=1e-5)
    assert in_memory.score(in_memory.model, "test") == pytest.approx(
        streamed.score(streamed.model, "test")
    )


def test_user_task_on_two_ray_workers(ray_session):
    """Classes of a notebook's __main__ travel by value; a test module must be registered so."""
    import sys

    from autoprune.parallel import RayBackend

    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = _loader_task(metric=top1_percent)
    vecs = [np.full(len(task.space), r) for r in (0.2, 0.5, 0.7)]
    serial = [Evaluator(task).evaluate(v).accuracy for v in vecs]
    backend = RayBackend(task, workers=2)
    try:
        remote = [e.accuracy for e in backend.map(vecs)]
    finally:
        backend.close()
    assert remote == pytest.approx(serial)


def test_bad_user_input_is_refused_before_any_search():
    train, test = _data(128, 1), _data(32, 3)
    with pytest.raises(ValueError, match="has 4 outputs, not num_classes=10"):
        task_from_module(_trained(), train, test, config=CONFIG, num_classes=10)
    with pytest.raises(ValueError, match="labels reach 3 but SmallNet has only 2 outputs"):
        task_from_module(SmallNet(classes=2), train, test, config=CONFIG)
    with pytest.raises(DataError, match=r"example_input has shape \(1, 1, 8, 8\)"):
        task_from_module(_trained(), train, test, example_input=torch.zeros(1, 1, 8, 8),
                         config=CONFIG)  # fmt: skip
    empty = DataLoader(TensorDataset(torch.zeros(0, *SHAPE), torch.zeros(0).long()))
    with pytest.raises(DataError, match="test data is empty"):
        task_from_module(_trained(), train, empty, config=CONFIG)

    def broken(_model, _batches):
        raise KeyError("no such column")

    with pytest.raises(ValueError, match="the metric raised KeyError"):
        task_from_module(_trained(), train, test, metric=broken, config=CONFIG)
    with pytest.raises(DataError, match=r"expected a .inputs, labels. pair"):
        task_from_module(_trained(), [1, 2, 3], test, config=CONFIG)


def test_user_task_experiment_is_tracked_in_mlflow(tmp_path: Path):
    from autoprune.runner.config import experiment_config
    from autoprune.runner.experiment import run_experiment

    task = _loader_task(metric=top1_percent)
    cfg = experiment_config(overrides=[
        "search.searchers=[random]", "search.evaluations=3", "search.workers=0",
        "search.budget=flops=0.6", "tracking.experiment=user",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])  # fmt: skip
    result = run_experiment(cfg, task=task)
    best = result.best
    assert best.policy.fingerprint["model"] == "SmallNet (nn.Module)"
    assert set(best.policy.ratios) == set(task.units)


def test_user_task_drives_the_environment_and_sensitivity(tmp_path: Path):
    from autoprune.envs.pruning_env import PruningEnv
    from gymnasium.utils.env_checker import check_env

    from autoprune import scan

    task = _loader_task(metric=top1_percent)
    env = PruningEnv(task, "flops=0.6")
    check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert info["evaluation"]["flops_ratio"] <= 0.6 + 1e-9
    sens = scan(Evaluator(task), grid=[0.5])
    assert set(sens.units) == set(task.units)
    import csv

    with sens.save_csv(tmp_path / "sens.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [r["unit"] for r in read] == list(sens.units)
    assert [float(r["accuracy"]) for r in read] == pytest.approx(sens.accuracy[:, 0].tolist())


def test_the_loss_reward_is_refused_for_a_task_with_its_own_metric():
    task = _loader_task(metric=top1_percent)
    with pytest.raises(SearchError, match="'loss' needs the cross-entropy"):
        search("ddpg", task, "flops=0.5", evaluations=4, warmup_episodes=2, reward="loss")
    from autoprune.envs import PruningEnv

    with pytest.raises(ValueError, match="'loss' needs the cross-entropy"):
        PruningEnv(task, "flops=0.5", reward="loss")


def test_labels_of_every_split_are_checked_before_any_work():
    train, test = _data(128, 1), _data(32, 3)
    bad_test = (test[0], test[1].clone())
    bad_test[1][5] = 7  # one label beyond the 4 outputs, in the test split only
    with pytest.raises(ValueError, match="test labels reach 7 but SmallNet has only 4 outputs"):
        task_from_module(_trained(), train, bad_test, config=CONFIG)
    loader = DataLoader(TensorDataset(*bad_test), batch_size=16)  # a streamed split too
    with pytest.raises(ValueError, match="test labels reach 7"):
        task_from_module(_trained(), train, loader, config=CONFIG)
    negative = (train[0], train[1].clone())
    negative[1][3] = -1
    with pytest.raises(DataError, match="train labels must be class indices >= 0, got -1"):
        task_from_module(_trained(), negative, test, config=CONFIG)
    fractional = (train[0], train[1].float() + 0.5)
    with pytest.raises(DataError, match="labels must be integer class indices"):
        task_from_module(_trained(), fractional, test, config=CONFIG)
    whole = (train[0], train[1].float())  # whole-number floats are class indices
    assert task_from_module(_trained(), whole, test, config=CONFIG).data.num_classes == 4
    small = (torch.randn(32, 1, 8, 8), test[1])
    with pytest.raises(DataError, match=r"test inputs have shape \(1, 8, 8\), training inputs"):
        task_from_module(_trained(), train, small, config=CONFIG)


def test_fine_and_nm_tasks_default_to_the_magnitude_criterion():
    train, test = _data(128, 1), _data(32, 3)
    for granularity in ("fine", "nm"):
        task = task_from_module(_trained(), train, test,
                                config={**CONFIG, "granularity": granularity})  # fmt: skip
        assert task.config.criterion == "magnitude"
    with pytest.raises(ValueError, match="criterion 'l2' does not apply to 'fine' pruning"):
        task_from_module(_trained(), train, test,
                         config={**CONFIG, "granularity": "fine", "criterion": "l2"})  # fmt: skip


def test_integer_inputs_are_refused_with_the_reason():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(x).mean(1))

    ids = torch.randint(0, 20, (128, 12))
    labels = torch.arange(128) % 4
    with pytest.raises(DataError, match=r"inputs are torch.int64.*token ids"):
        task_from_module(Tokens(), (ids, labels), (ids[:32], labels[:32]), config=CONFIG)


def test_fine_tuning_a_fully_frozen_model_is_refused_before_any_work():
    model = _trained()
    for p in model.parameters():
        p.requires_grad_(False)
    task = task_from_module(model, _data(128, 1), _data(32, 3), config=CONFIG)
    with pytest.raises(ValueError, match="every parameter of the model is frozen"):
        apply_policy(task, {"c1": 0.5}, finetune_epochs=1)
    assert apply_policy(task, {"c1": 0.5}).after["test_accuracy"] >= 0  # no fine-tune: fine


class OneUnit(nn.Module):
    """Exactly one prunable unit: the first environment step is also the last."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


def test_one_unit_task_with_a_metric_passes_the_environment_checker():
    from autoprune.envs.pruning_env import PruningEnv
    from gymnasium.utils.env_checker import check_env

    from autoprune.evaluate import Evaluation

    task = task_from_module(OneUnit(), _data(128, 1), _data(32, 3), metric=top1_percent,
                            config=CONFIG)  # fmt: skip
    env = PruningEnv(task, "flops=0.6")
    check_env(env, skip_render_check=True)  # compares two terminal infos: NaN != NaN failed it
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and info["loss"] is None and info["evaluation"]["loss"] is None
    assert np.isnan(Evaluation.from_dict(info["evaluation"]).loss)


def test_a_metric_that_turns_non_finite_on_a_pruned_model_stops_the_search_clearly():
    def fragile(model, batches):  # finite on the dense model, NaN once c1 is pruned
        return float("nan") if model.c1.out_channels < 8 else top1_percent(model, batches)

    task = task_from_module(_trained(), _data(128, 1), _data(32, 3), metric=fragile,
                            config=CONFIG)  # fmt: skip
    with pytest.raises(ValueError, match=r"the metric returned nan .* a finite float"):
        search("random", task, "flops=0.6", seed=0, evaluations=4)


def test_netadapt_returns_the_dense_model_when_it_meets_the_budget():
    task = task_from_module(_trained(), _data(128, 1), _data(32, 3), config=CONFIG)
    result = search("netadapt", task, "flops=1.0", evaluations=4)
    assert result.best is not None and result.evaluations == 1
    assert all(r == 0 for r in result.best_ratios.values())


def test_small_max_ratios_build_channel_tasks():
    for max_ratio in (0.05, 0.2):
        task = task_from_module(_trained(), _data(128, 1), _data(32, 3),
                                config={**CONFIG, "max_ratio": max_ratio})  # fmt: skip
        assert task.space.max_ratio == max_ratio


def test_a_torch_compiled_model_is_pruned_as_its_module(tmp_path: Path):
    """``torch.compile`` wraps the module (names gain ``_orig_mod.``, the tracer sees compiled
    graphs and refused it as mis-traced): the task prunes the module inside, exactly as the
    plain model (the wrapper is never called, so no compiler is needed)."""
    from autoprune.policy import Policy

    train, test = _data(256, 1), _data(96, 3)
    plain = task_from_module(_trained(), train=train, test=test, config=CONFIG)
    task = task_from_module(torch.compile(_trained()), train=train, test=test, config=CONFIG)
    assert task.units == plain.units and type(task.model) is SmallNet
    ratios = task.ratios_dict(np.full(len(task.units), 0.5))
    policy = Policy.from_task(task, ratios)
    pruned = apply_policy(task, policy, finetune_epochs=0, latency=False).model
    expected = apply_policy(plain, Policy.from_task(plain, ratios), latency=False).model
    x = test[0][:8]
    assert pruned.c1.out_channels == 4 and pruned.c2.out_channels == 6
    assert torch.allclose(pruned.eval()(x), expected.eval()(x), atol=1e-5)
    loaded, _ = load_pruned(
        save_pruned(tmp_path / "p.pt", task, pruned, policy), model=torch.compile(SmallNet())
    )
    assert torch.allclose(loaded.eval()(x), expected(x), atol=1e-5)
