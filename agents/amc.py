"""AMC's extensions to stable-baselines3 (He et al., ECCV 2018), through SB3's extension points
(action noise, replay buffers, callbacks, the algorithm's hooks), without forking SB3:

- **exploration**: a truncated normal around the actor's action (:class:`TruncatedNormalNoise`,
  used by :meth:`AMCDDPG._sample_action`), decaying per episode after warm-up
  (:class:`NoiseDecay` callback);
- **warm-up**: random actions for ``learning_starts`` steps, or (``AMCDDPG.warmup_centre``) a
  truncated normal around given actions;
- **episode credit**: the episode's final reward is credited to every transition of that episode,
  minus a moving-average baseline (:class:`EpisodeCreditBuffer`, a replay buffer);
- **applied actions**: the replay buffer stores the action the environment applied after AMC's
  budget clipping (:class:`AppliedActionBuffer`);
- **two learning rates**: actor and critic (:meth:`AMCDDPG._update_learning_rate`);
- **elite exploration** (off by default): episodes that explore around the best policy so far;
- **no log folder**: :func:`quiet_logger`, a logger that writes nothing anywhere.

The searcher that puts them together is :mod:`autoprune.agents.ddpg`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium import spaces
from scipy.stats import truncnorm
from stable_baselines3 import DDPG
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise, VectorizedActionNoise
from stable_baselines3.common.utils import update_learning_rate


def quiet_logger() -> Logger:
    """An SB3 logger with no output and no folder. Without one, SB3 configures a logger per
    model at ``learn`` (``configure_logger``), which creates an empty ``SB3-<date>`` folder in
    the temp directory even with nothing to write."""
    return Logger(folder=None, output_formats=[])


class EpisodeListener(Protocol):
    """What :class:`NoiseDecay` reports finished episodes to (the ddpg searcher)."""

    @property
    def remaining(self) -> int | None: ...

    def episode_done(self, info: dict[str, Any], warmup: bool) -> None: ...

    def warmup_done(self) -> None: ...


class TruncatedNormalNoise(ActionNoise):
    """AMC's exploration: sample around the actor's action from a normal truncated to [-1, 1].

    ``sigma`` is on AMC's [0, 1] action scale (0.5 there); our actions span [-1, 1], so the
    normal's scale is ``2 * sigma``.
    """

    def __init__(self, sigma: float, seed: int = 0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.rng = np.random.default_rng(seed)

    def around(self, action: np.ndarray) -> np.ndarray:
        scale = max(2.0 * self.sigma, 1e-6)
        lo, hi = (-1.0 - action) / scale, (1.0 - action) / scale
        return truncnorm.rvs(lo, hi, loc=action, scale=scale, random_state=self.rng)

    def __call__(self) -> np.ndarray:  # SB3's additive interface: centred noise
        return self.around(np.zeros(1))

    def __repr__(self) -> str:
        return f"TruncatedNormalNoise(sigma={self.sigma:.4f})"


def _noises(noise: ActionNoise | None) -> list[ActionNoise]:
    """The noise processes behind SB3's per-environment wrapper (one when not wrapped)."""
    if noise is None:
        return []
    if isinstance(noise, VectorizedActionNoise):
        return list(noise.noises)
    return [noise]


class AppliedActionBuffer(ReplayBuffer):
    """A replay buffer that stores the action the environment applied (after AMC's budget
    clipping, ``info["ratio"]``), not the one the agent proposed: the critic then learns the
    value of actions that were taken. ``max_ratio=None`` stores the proposed actions."""

    def __init__(self, *args: Any, max_ratio: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_ratio = max_ratio

    def applied(self, action: np.ndarray, infos: list[dict[str, Any]]) -> np.ndarray:
        action = np.array(action, dtype=np.float32).reshape(len(infos), -1)
        if self.max_ratio is None:
            return action
        for i, info in enumerate(infos):
            if "ratio" in info:  # the env's inverse map: ratio = (a + 1) / 2 * max_ratio
                action[i, 0] = 2.0 * float(info["ratio"]) / self.max_ratio - 1.0
        return action

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        super().add(obs, next_obs, self.applied(action, infos), reward, done, infos)


class EpisodeCreditBuffer(AppliedActionBuffer):
    """A replay buffer that stores an episode's transitions when it ends, each with the episode's
    final reward minus a moving-average baseline (AMC). Storage is single-env internally, so any
    number of parallel environments works."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        baseline_alpha: float | None = 0.95,
        bootstrap: bool = False,
        max_ratio: float | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__(
            buffer_size, observation_space, action_space, device, n_envs=1,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=handle_timeout_termination, max_ratio=max_ratio,
        )  # fmt: skip
        self.parallel_envs = n_envs
        self.baseline_alpha = baseline_alpha
        self.bootstrap = bootstrap
        self.moving_average: float | None = None
        self.standardize = standardize
        # Welford's running count, mean and sum of squared deviations of the episodes' rewards
        self._count, self._mean, self._m2 = 0, 0.0, 0.0
        self._pending: list[list[tuple[Any, ...]]] = [[] for _ in range(n_envs)]

    def credit(self, reward: float) -> float:
        """The reward credited to every step of an episode: minus the moving-average baseline,
        or (``standardize``) standardised by the mean and std of every episode's reward so far,
        this one included (std floored at 1e-3; the first episode is credited 0)."""
        if self.standardize:
            self._count += 1
            delta = reward - self._mean
            self._mean += delta / self._count
            self._m2 += delta * (reward - self._mean)
            std = (self._m2 / self._count) ** 0.5
            return (reward - self._mean) / max(std, 1e-3)
        if self.baseline_alpha is None:
            return reward
        if self.moving_average is None:
            self.moving_average = reward
        else:
            self.moving_average += (1 - self.baseline_alpha) * (reward - self.moving_average)
        return reward - self.moving_average

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        action = self.applied(action, infos)
        for i in range(len(done)):
            self._pending[i].append((obs[i], next_obs[i], action[i], infos[i]))
            if not done[i]:
                continue
            credited = self.credit(float(reward[i]))
            episode, self._pending[i] = self._pending[i], []
            applied = infos[i].get("applied")
            if self.max_ratio is not None and applied is not None and len(applied) == len(episode):
                # what the episode's end evaluated (the budget filled, or projected against
                # rounding), not what each step applied on the way
                episode = [
                    (o, o2, np.array([2.0 * r / self.max_ratio - 1.0], dtype=np.float32), info)
                    for (o, o2, _, info), r in zip(episode, applied, strict=True)
                ]
            for t, (o, o2, a, info) in enumerate(episode):
                last = t == len(episode) - 1
                terminal = last or not self.bootstrap
                ReplayBuffer.add(
                    self, o[None], o2[None], a[None], np.array([credited]), np.array([terminal]),
                    [info],
                )  # fmt: skip


class AMCDDPG(DDPG):
    """SB3 DDPG with separate actor / critic learning rates and truncated-normal exploration."""

    def __init__(self, *args: Any, critic_lr: float | None = None, **kwargs: Any) -> None:
        self.critic_lr = critic_lr
        # Elite exploration (off by default): set by the ddpg searcher. With probability
        # ``elite_prob`` an episode after the warm-up explores around the best policy found so
        # far (``elite()``: its actions, one per unit) instead of around the actor's output;
        # the transitions train the actor and critic all the same (DDPG is off-policy).
        self.elite: Callable[[], np.ndarray | None] | None = None
        self.elite_prob = 0.0
        self.elite_rng = np.random.default_rng(0)
        self.units = 1
        self._elite_mask = np.zeros(1, dtype=bool)
        # Warm-up prior (off by default: AMC's uniform random actions): set by
        # the ddpg searcher. Warm-up actions are drawn from ``warmup_noise`` around
        # ``warmup_centre``, one action per unit.
        self.warmup_centre: np.ndarray | None = None
        self.warmup_noise: TruncatedNormalNoise | None = None
        super().__init__(*args, **kwargs)

    def _update_learning_rate(self, optimizers: Any) -> None:
        if self.critic_lr is None or not isinstance(optimizers, list) or len(optimizers) != 2:
            super()._update_learning_rate(optimizers)
            return
        actor, critic = optimizers
        update_learning_rate(actor, self.lr_schedule(self._current_progress_remaining))
        update_learning_rate(critic, self.critic_lr)

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.num_timesteps < learning_starts:
            if self.warmup_centre is not None and self.warmup_noise is not None:
                t = (self.num_timesteps // n_envs) % self.units  # episodes run in lockstep
                centre = np.full((n_envs, 1), self.warmup_centre[t], dtype=np.float64)
                scaled = self.warmup_noise.around(centre).reshape(n_envs, -1).astype(np.float32)
                return self.policy.unscale_action(scaled), scaled
            action = np.array([self.action_space.sample() for _ in range(n_envs)])
            return action, self.policy.scale_action(action)
        noises = _noises(action_noise)
        if not noises or not isinstance(noises[0], TruncatedNormalNoise):
            return super()._sample_action(learning_starts, action_noise, n_envs)
        assert self._last_obs is not None
        unscaled, _ = self.predict(self._last_obs, deterministic=True)
        centre = np.array(self.policy.scale_action(unscaled), dtype=np.float64).reshape(n_envs, -1)
        if self.elite is not None and self.elite_prob > 0:
            # Episodes run in lockstep, one unit per step: the unit of this step.
            t = (self.num_timesteps // n_envs) % self.units
            if t == 0 or len(self._elite_mask) != n_envs:
                self._elite_mask = self.elite_rng.random(n_envs) < self.elite_prob
            best = self.elite() if self._elite_mask.any() else None
            if best is not None:
                centre[self._elite_mask, 0] = best[t]
        # One generator for every environment (SB3's per-env copies would repeat its draws).
        scaled = noises[0].around(centre).reshape(n_envs, -1).astype(np.float32)
        return self.policy.unscale_action(scaled), scaled


class NoiseDecay(BaseCallback):
    """Decays the exploration sigma by ``decay`` after every episode past the warm-up, and
    reports every finished episode to the searcher."""

    def __init__(self, searcher: EpisodeListener, warmup: int, decay: float) -> None:
        super().__init__()
        self.searcher = searcher
        self.warmup = warmup
        self.decay = decay
        self.episodes = 0

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if not done:
                continue
            self.episodes += 1
            self.searcher.episode_done(info, warmup=self.episodes <= self.warmup)
            if self.episodes == self.warmup:
                self.searcher.warmup_done()
            if self.episodes <= self.warmup:
                continue
            for noise in _noises(self.model.action_noise):
                if isinstance(noise, TruncatedNormalNoise):
                    noise.sigma *= self.decay
                elif isinstance(noise, NormalActionNoise):
                    noise._sigma = noise._sigma * self.decay
        return self.searcher.remaining is None or self.searcher.remaining > 0
