"""PruningEnv: the Gymnasium and SB3 checkers, the budget guarantee, determinism, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from autoprune.envs import ENV_ID, PruningEnv
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoprune as ap
from autoprune.costs.counting import count_params, measure_macs
from autoprune.evaluate import Evaluation
from autoprune.models import MODELS, build_model
from autoprune.task import Task


def zoo_task(name: str, folder: Path, granularity: str = "channel") -> Task:
    """A task on digits with a randomly initialised zoo model (costs do not need training)."""
    criterion = "l2" if granularity == "channel" else "magnitude"
    cfg = ap.task_config(
        overrides=[f"model.name={name}", f"granularity={granularity}", f"criterion={criterion}"]
    )
    torch.manual_seed(0)
    from autoprune.data import load_data

    data = load_data(cfg.data)
    model = build_model(name, data.in_channels, data.num_classes)
    ckpt = folder / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    return Task(cfg, model, data, ckpt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env")


@pytest.mark.parametrize("granularity", ["channel", "fine", "nm"])
def test_checkers_pass_without_warnings(default_task, granularity: str, folder: Path):
    task = default_task if granularity == "channel" else zoo_task("resnet20", folder, granularity)
    env = PruningEnv(task, budget="flops=0.5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)
    messages = [str(w.message) for w in caught if "autoprune" not in str(w.filename)]
    assert not [m for m in messages if "action" in m.lower() or "reward" in m.lower()], messages


def _run(env: PruningEnv, actions: np.ndarray) -> tuple[float, dict]:
    env.reset(seed=0)
    for a in actions:
        _, reward, terminated, truncated, info = env.step(np.array([a], dtype=np.float32))
        assert isinstance(reward, float) and isinstance(terminated, bool)
    assert terminated and not truncated
    return reward, info


def _measured(task: Task, env: PruningEnv, info: dict, metric: str) -> float:
    pruned = task.prune(info["policy"])
    if metric == "flops":
        return measure_macs(pruned, task.input_shape) / task.space.dense_macs
    if metric == "params":
        return count_params(pruned) / task.space.dense_params
    return task.latency_table.predict_model(pruned) / task.dense_latency_predicted


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_actions_meet_the_budget(name: str, folder: Path):
    """Random, all-minimum and all-maximum action sequences end within budget, measured on the
    physically pruned model, with every ratio in [0, max_ratio]."""
    task = zoo_task(name, folder)
    rng = np.random.default_rng(0)
    n = len(task.units)
    for metric in ("flops", "params", "latency"):
        for limit in (0.2, 0.5, 0.9):
            try:
                env = PruningEnv(task, budget={metric: limit})
            except ap.BudgetError as exc:
                assert "smallest reachable" in str(exc)
                continue
            for actions in (-np.ones(n), np.ones(n), rng.uniform(-1, 1, n)):
                _, info = _run(env, actions)
                ratios = np.array(list(info["policy"].values()))
                assert (ratios >= 0).all() and (ratios <= task.space.max_ratio + 1e-9).all()
                assert _measured(task, env, info, metric) <= limit * 1.01, (metric, limit)


def test_budget_guarantee_default_task(default_task):
    env = PruningEnv(default_task, budget="flops=0.3,params=0.4")
    n = len(default_task.units)
    for actions in (-np.ones(n), np.random.default_rng(1).uniform(-1, 1, n)):
        _, info = _run(env, actions)
        assert info["flops_ratio"] <= 0.3 + 1e-9 and info["params_ratio"] <= 0.4 + 1e-9
        assert all(0 <= r <= 0.8 for r in info["policy"].values())


def test_same_seed_same_actions_same_episode(default_task):
    actions = np.random.default_rng(2).uniform(-1, 1, len(default_task.units))

    def episode() -> list:
        env = PruningEnv(default_task, budget="flops=0.5")
        obs, _ = env.reset(seed=7)
        out = [obs]
        for a in actions:
            obs, reward, _, _, info = env.step(np.array([a], dtype=np.float32))
            out.extend([obs, reward, info.get("ratio"), info.get("accuracy")])
        return out

    a, b = episode(), episode()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_terminal_info_and_rewards(default_task):
    env = PruningEnv(default_task, budget="flops=0.5", reward="acc_log_flops")
    reward, info = _run(env, np.zeros(len(default_task.units)))
    assert set(info) >= {"policy", "accuracy", "loss", "flops_ratio", "params_ratio"}
    macs, _ = default_task.space.costs(np.asarray(info["applied"]))
    assert reward == pytest.approx(-(1 - info["accuracy"]) * np.log(macs))  # AMC: absolute FLOPs
    custom = PruningEnv(default_task, budget="flops=0.5", reward=lambda e: 2.0 * e.accuracy)
    reward, info = _run(custom, np.zeros(len(default_task.units)))
    assert reward == pytest.approx(2 * info["accuracy"])


@pytest.mark.parametrize("name", ["acc_log_flops", "acc_log_params", "acc_log_latency"])
def test_cost_rewards_rise_with_accuracy_and_fall_with_cost(name: str):
    from autoprune.envs.rewards import REWARDS

    def evaluation(accuracy: float, ratio: float) -> Evaluation:
        return Evaluation(ratios={}, accuracy=accuracy, loss=0.0, flops_ratio=ratio,
                          params_ratio=ratio, macs=ratio * 4e7, params=ratio * 3e5,
                          latency_ratio_table=ratio)  # fmt: skip

    reward = REWARDS[name]
    for ratio in (0.1, 0.5, 1.0):  # at equal cost, the more accurate policy wins
        assert (
            reward(evaluation(0.9, ratio))
            > reward(evaluation(0.5, ratio))
            > reward(evaluation(0.1, ratio))
        )
    for accuracy in (0.2, 0.8):  # at equal (imperfect) accuracy, the cheaper policy wins
        assert reward(evaluation(accuracy, 0.25)) > reward(evaluation(accuracy, 0.5))
    assert reward(evaluation(1.0, 1.0)) > reward(evaluation(0.0, 0.25))  # dense and perfect


def test_gym_make_and_sb3(default_task):
    from stable_baselines3 import DDPG
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = gym.make(ENV_ID, task=default_task, budget="flops=0.5")
    assert isinstance(env.unwrapped, PruningEnv)
    vec = DummyVecEnv([lambda: Monitor(PruningEnv(default_task, budget="flops=0.5"))])
    n = len(default_task.units)
    model = DDPG("MlpPolicy", vec, learning_starts=n, batch_size=8, seed=0, verbose=0)
    model.learn(total_timesteps=3 * n)
    episodes = vec.envs[0].get_episode_rewards()
    assert len(episodes) == 3 and all(0 <= r <= 1 for r in episodes)


def test_bad_input(default_task, folder: Path):
    with pytest.raises(ap.BudgetError, match="smallest reachable"):
        PruningEnv(default_task, budget="flops=0.01")
    with pytest.raises(ValueError, match="unknown reward 'accuracy'"):
        PruningEnv(default_task, reward="accuracy")
    with pytest.raises(ap.BudgetError, match="latency budgets need channel granularity"):
        PruningEnv(zoo_task("resnet20", folder, "fine"), budget="latency=0.5")
    with pytest.raises(ap.BudgetError, match="unknown budget metric"):
        PruningEnv(default_task, budget="energy=0.5")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metric=st.sampled_from(["flops", "params"]),
    limit=st.floats(0.2, 0.9),
    actions=st.lists(st.floats(-1, 1, width=32), min_size=12, max_size=12),
)
def test_property_any_actions_meet_the_budget(default_task, metric, limit, actions):
    env = PruningEnv(default_task, budget={metric: limit})
    _, info = _run(env, np.array(actions))
    assert _measured(default_task, env, info, metric) <= limit * 1.01
    assert all(0 <= r <= default_task.space.max_ratio for r in info["policy"].values())


def test_fill_budget_gives_back_what_over_pruning_left(default_task):
    """Every unit at the maximum ratio prunes far more than flops=0.5 asks: with fill_budget the
    episode is scaled towards the dense model until it just meets the budget (measured MACs of
    the pruned model, not the env's bookkeeping), keeping which units are pruned most."""
    actions = np.linspace(0.2, 1.0, len(default_task.units))
    costs, applied = {}, {}
    for fill in (False, True):
        env = PruningEnv(default_task, "flops=0.5", fill_budget=fill)
        env.reset(seed=0)
        for a in actions:
            *_, done, _, info = env.step(np.array([a], dtype=np.float32))
        assert done
        vec = np.array(info["applied"])
        space = default_task.space  # the policy recorded: the same channels removed
        assert (space.removed_counts(default_task.ratio_vector(info["policy"]))
                == space.removed_counts(vec)).all()  # fmt: skip
        dense = measure_macs(default_task.model, default_task.input_shape)
        costs[fill] = measure_macs(default_task.prune(vec), default_task.input_shape) / dense
        applied[fill] = vec
    assert costs[False] < 0.35  # over-pruned
    assert 0.48 <= costs[True] <= 0.5 + 1e-6  # on the budget's boundary
    order = np.argsort(applied[False], kind="stable")
    assert np.all(np.diff(applied[True][order]) >= -1e-9)  # the same ranking of units
