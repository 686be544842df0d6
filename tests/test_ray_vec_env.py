"""RayVecEnv: same results as DummyVecEnv, the VecEnv API, recovery from dead actors, errors."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import ray
from autoprune.envs.ray_vec_env import RayVecEnv, RayVecEnvError
from gymnasium import spaces
from ray import cloudpickle
from stable_baselines3 import DDPG
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

# Ray workers cannot import this test module: send the toy env's code along with its env_fns.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPISODE_LENGTH = 5
SETUP_MARK = "RAY_VEC_ENV_TEST_SETUP"
GOAL = 2.0


class ToyEnv(gym.Env[np.ndarray, np.ndarray]):
    """A tiny deterministic-given-its-seed env: push a point to the goal within five steps.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: the push.

    ## Observation Space
    ``Box(-10, 10, (2,), float32)``: position, elapsed fraction of the episode.

    ## Rewards
    ``push - 0.1 * |push| + noise``: the noise comes from ``np_random``, so seeding matters.

    ## Episode End
    Terminated when the position passes ``GOAL``; truncated after ``EPISODE_LENGTH`` steps.
    The start position is drawn from ``np_random`` or given as ``options["x0"]``.
    """

    observation_space = spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, die_file: str | None = None) -> None:
        self.counter = 0
        self.setup_seen = os.environ.get(SETUP_MARK)  # did worker_setup run before the env?
        self.fail_on_step = False
        self.die_file = die_file
        self.x = 0.0
        self.t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        x0 = (options or {}).get("x0")
        self.x = float(self.np_random.uniform(-0.5, 0.5)) if x0 is None else float(x0)
        self.t = 0
        return self._obs(), {"x0": self.x}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.fail_on_step:
            raise ValueError("boom")
        if self.die_file is not None and Path(self.die_file).exists():
            os._exit(1)
        push = float(np.clip(action[0], -1.0, 1.0))
        self.x += push + float(self.np_random.normal(0.0, 0.05))
        self.t += 1
        reward = push - 0.1 * abs(push) + float(self.np_random.normal(0.0, 0.01))
        terminated = self.x > GOAL
        return self._obs(), reward, terminated, self.t >= EPISODE_LENGTH, {"t": self.t}

    def bump(self, by: int = 1) -> int:
        """Add to the counter (for env_method)."""
        self.counter += by
        return self.counter

    def pid(self) -> int:
        """The process the env lives in."""
        return os.getpid()

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.t / EPISODE_LENGTH], dtype=np.float32)


ENV_FNS: list[Callable[[], gym.Env]] = [ToyEnv, ToyEnv]
# Extra one-off RayVecEnvs reserve no CPU, so they start beside the module's `venv` on any cluster.
NO_CPU = {"num_cpus": 0}


def mark_worker() -> None:
    """The worker_setup of the tests: leave a mark the toy env reads when it is built."""
    os.environ[SETUP_MARK] = "done"


def actions_at(step: int) -> np.ndarray:
    """Sub-env 0 pushes hard (it terminates early), sub-env 1 wanders (it is truncated)."""
    return np.array([[0.9], [0.5 * np.sin(step)]], dtype=np.float32)


def dummy_venv() -> DummyVecEnv:
    """The reference: the same envs in-process, wrapped in Monitor as RayVecEnv does."""
    return DummyVecEnv([lambda: Monitor(ToyEnv()) for _ in ENV_FNS])


def assert_infos_equal(infos: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Infos are equal; arrays compared by value, Monitor's wall-clock time ignored."""
    assert len(infos) == len(expected)
    for info, want in zip(infos, expected, strict=True):
        assert info.keys() == want.keys()
        for key, value in want.items():
            if key == "terminal_observation":
                np.testing.assert_array_equal(info[key], value)
            elif key == "episode":
                assert {k: info[key][k] for k in "rl"} == {k: value[k] for k in "rl"}
            else:
                assert info[key] == value, key


def assert_steps_match(venv: VecEnv, ref: VecEnv, steps: range) -> list[dict[str, Any]]:
    """Step both with the same actions; every output must match. Returns all infos."""
    seen: list[dict[str, Any]] = []
    for step in steps:
        obs, rewards, dones, infos = venv.step(actions_at(step))
        ref_obs, ref_rewards, ref_dones, ref_infos = ref.step(actions_at(step))
        np.testing.assert_array_equal(obs, ref_obs)
        np.testing.assert_array_equal(rewards.astype(np.float32), ref_rewards)
        np.testing.assert_array_equal(dones, ref_dones)
        assert_infos_equal(infos, ref_infos)
        assert venv.reset_infos == ref.reset_infos
        seen.extend(infos)
    return seen


def reset_both(venv: VecEnv, ref: VecEnv, seed: int) -> None:
    """Seed and reset both; the first observations must match."""
    venv.seed(seed)
    ref.seed(seed)
    np.testing.assert_array_equal(venv.reset(), ref.reset())
    assert venv.reset_infos == ref.reset_infos


@pytest.fixture(scope="module")
def venv(ray_session: Any) -> Iterator[RayVecEnv]:
    """Two toy envs in two actors, shared by the tests of this module (actors start slowly)."""
    env = RayVecEnv(ENV_FNS, worker_setup=mark_worker)
    yield env
    env.close()


def test_matches_dummy_vec_env_over_several_episodes(venv: RayVecEnv) -> None:
    ref = dummy_venv()
    reset_both(venv, ref, seed=7)
    infos = assert_steps_match(venv, ref, range(14))
    ends = [info for info in infos if "terminal_observation" in info]
    assert any(info["TimeLimit.truncated"] for info in ends)  # sub-env 1 runs out of time
    assert any(not info["TimeLimit.truncated"] for info in ends)  # sub-env 0 reaches the goal
    assert venv.observation_space == ref.observation_space
    assert venv.action_space == ref.action_space


def test_monitor_episode_info_at_episode_end(venv: RayVecEnv) -> None:
    venv.seed(1)
    venv.reset()
    total, length = 0.0, 0
    for step in range(EPISODE_LENGTH):
        _, rewards, dones, infos = venv.step(actions_at(step))
        total, length = total + float(rewards[1]), length + 1
        if dones[1]:
            break
    assert dones[1] and infos[1]["episode"]["l"] == length
    assert infos[1]["episode"]["r"] == pytest.approx(total, abs=1e-5)


def test_seeds_and_options_reach_the_sub_envs(venv: RayVecEnv) -> None:
    assert venv.seed(3) == [3, 4]
    venv.set_options([{"x0": 0.25}, {}])
    obs = venv.reset()
    assert obs[0, 0] == np.float32(0.25)
    np.testing.assert_array_equal(obs[1], ToyEnv().reset(seed=4)[0])
    assert venv.reset_infos[1] == ToyEnv().reset(seed=4)[1]
    assert venv._seeds == [None, None] and venv._options == [{}, {}]  # used once
    assert venv.reset()[0, 0] != np.float32(0.25)


def test_get_set_attr_and_env_method_with_indices(venv: RayVecEnv) -> None:
    venv.set_attr("counter", 0)
    venv.set_attr("counter", 5, indices=[1])
    assert venv.get_attr("counter") == [0, 5]
    assert venv.env_method("bump", 2, indices=1) == [7]
    assert venv.env_method("bump", by=3) == [3, 10]
    assert venv.get_attr("counter", indices=[1, 0]) == [10, 3]
    assert venv.has_attr("counter") and not venv.has_attr("no_such_attribute")
    with pytest.raises(AttributeError, match="sub-env 0"):
        venv.get_attr("no_such_attribute", indices=0)
    assert venv.env_is_wrapped(Monitor) == [True, True]
    assert venv.env_is_wrapped(gym.wrappers.TimeLimit, indices=[0]) == [False]
    assert venv.render_mode is None
    assert venv.get_attr("setup_seen") == ["done", "done"]
    with pytest.warns(UserWarning, match="render mode"):
        assert venv.get_images() == [None, None]


def test_env_exception_is_raised_with_the_sub_env_index(venv: RayVecEnv) -> None:
    venv.reset()
    venv.set_attr("fail_on_step", True, indices=1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"sub-env 1: step raised ValueError: boom"):
        venv.step(actions_at(0))
    assert time.monotonic() - start < 5
    venv.set_attr("fail_on_step", False)
    assert venv.step(actions_at(1))[0].shape == (2, 2)  # still usable


def test_dead_actors_are_replaced_and_their_episode_replayed(venv: RayVecEnv) -> None:
    ref = dummy_venv()
    reset_both(venv, ref, seed=11)
    assert_steps_match(venv, ref, range(4))  # sub-env 0 is into its second (unseeded) episode
    restarts = venv.restarts
    old_actor = venv.actors[0]
    ray.kill(venv.actors[0])
    assert_steps_match(venv, ref, range(4, 7))
    assert venv.restarts == restarts + 1 and venv.actors[0] is not old_actor

    # The worker process of sub-env 1 dies while a step is pending.
    pid = venv.env_method("pid", indices=1)[0]
    venv.step_async(actions_at(7))
    os.kill(pid, signal.SIGKILL)
    obs, _, _, _ = venv.step_wait()
    ref_obs, _, _, _ = ref.step(actions_at(7))
    np.testing.assert_array_equal(obs, ref_obs)
    assert_steps_match(venv, ref, range(8, 12))
    assert venv.restarts == restarts + 2
    assert venv.get_attr("setup_seen") == ["done", "done"]  # replacements run worker_setup too


def test_ddpg_learns_with_ray_vec_env(venv: RayVecEnv) -> None:
    model = DDPG(
        "MlpPolicy",
        venv,
        # SB3 refuses episodic train_freq with several envs ("You must use only one env when
        # doing episodic training"): train every EPISODE_LENGTH vector steps instead.
        train_freq=(EPISODE_LENGTH, "step"),
        learning_starts=10,
        policy_kwargs={"net_arch": [16]},
        seed=0,
    )
    model.learn(total_timesteps=40)
    assert model.num_timesteps >= 40


def test_gives_up_after_max_restarts(ray_session: Any, tmp_path: Path) -> None:
    # max_restarts=0 gives up at the first death: one actor start instead of two (~4 s each).
    die_file = tmp_path / "die"
    env = RayVecEnv([partial(ToyEnv, die_file=str(die_file))], NO_CPU, max_restarts=0)
    try:
        env.reset()
        die_file.touch()
        with pytest.raises(RayVecEnvError, match=r"sub-env 0: .*max_restarts=0"):
            env.step(np.zeros((1, 1), dtype=np.float32))
        assert env.restarts == 0
    finally:
        env.close()


def test_refuses_rays_own_actor_restarts(ray_session: Any) -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        RayVecEnv(ENV_FNS, actor_options={"max_restarts": 2})


def test_needs_ray_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"ray\.init"):
        RayVecEnv(ENV_FNS)


def test_env_build_failure_is_not_retried(ray_session: Any) -> None:
    def broken() -> gym.Env:
        raise OSError("no such dataset")

    with pytest.raises(
        RayVecEnvError, match=r"(?s)sub-env 0: building its env failed.*OSError: no such dataset"
    ):
        RayVecEnv([broken], NO_CPU)
