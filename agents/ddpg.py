"""``ddpg``: the AMC agent, stable-baselines3 DDPG on PruningEnv (He et al., ECCV 2018).

AMC's recipe is added through SB3's extension points, without forking SB3:

- **warm-up**: ``learning_starts`` = ``warmup_episodes`` x units, with uniform random actions
  (or, ``warmup_prior="uniform"``, a truncated normal around the uniform policy's actions: the
  prior AMC's code left commented out, centred on the budget's ratio); ``actor_start`` fits
  the actor to the uniform policy, or to the best warm-up policy when the warm-up ends
  (behaviour cloning through the actor's own network, before DDPG's updates take over);
- **exploration**: a truncated normal around the actor's action (:class:`TruncatedNormalNoise`,
  used by :meth:`AMCDDPG._sample_action`), decaying per episode after warm-up
  (:class:`NoiseDecay` callback). AMC uses sigma 0.5 on its [0, 1] action scale decaying by 0.95;
  our defaults are sigma 0.3 decaying by 0.98, which on ResNet-20/digits at FLOPs 0.25 found
  better policies than AMC's values (300 episodes, 3 seeds: best search accuracy 64.5% vs 55-56%,
  where AMC's fast decay leaves the agent exploiting after ~60 episodes);
- **episode credit**: the episode's final reward is credited to every transition of that episode,
  minus a moving-average baseline (:class:`EpisodeCreditBuffer`, a replay buffer);
- **two learning rates**: actor 1e-4, critic 1e-3 (:meth:`AMCDDPG._update_learning_rate`);
- 300-300 actor and critic, tau 0.01, batch 64, gamma 1.0.

Three defaults go beyond AMC, measured on ResNet-20 / Fashion-MNIST at 300 evaluations, 5 seeds
(issue 16, README "The agent against the other searchers"): ``warmup_prior="uniform"``,
``fill_budget=True`` (an episode that pruned more than the budget asks is scaled back onto it
before its evaluation) and ``actor_start="best"`` (chosen over ``"random"`` by rule on held-out
seeds 5-9). ``warmup_prior="random", fill_budget=False, actor_start="random"`` is AMC's agent.

Every piece is an option, so ``algo="td3"``, ``noise="normal"``, ``episode_credit=False``,
``baseline=False`` and ``warmup_episodes=0`` give plain SB3 DDPG / TD3.

With the reward credited to every step, each transition's target is that reward itself
(``bootstrap=False``, the default): the critic learns the final reward of the episode a
(state, action) pair leads to, and gamma does not compound the same reward over the remaining
steps. ``bootstrap=True`` keeps SB3's usual TD target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from autoprune.agents.base import Preflight, Problem, Searcher, SearchError
from autoprune.agents.registry import register
from autoprune.envs import PruningEnv
from autoprune.envs.rewards import REWARDS
from gymnasium import spaces
from pydantic import AfterValidator, Field, WithJsonSchema
from scipy.stats import truncnorm
from stable_baselines3 import DDPG, TD3
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise, VectorizedActionNoise
from stable_baselines3.common.utils import update_learning_rate
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from autoprune.evaluate import Evaluation
from autoprune.parallel import RayBackend, TaskSpec, worker_task


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
        # Elite exploration (off by default): set by DDPGSearcher._build. With probability
        # ``elite_prob`` an episode after the warm-up explores around the best policy found so
        # far (``elite()``: its actions, one per unit) instead of around the actor's output;
        # the transitions train the actor and critic all the same (DDPG is off-policy).
        self.elite: Callable[[], np.ndarray | None] | None = None
        self.elite_prob = 0.0
        self.elite_rng = np.random.default_rng(0)
        self.units = 1
        self._elite_mask = np.zeros(1, dtype=bool)
        # Warm-up prior (off by default: AMC's uniform random actions): set by
        # DDPGSearcher._build. Warm-up actions are drawn from ``warmup_noise`` around
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

    def __init__(self, searcher: DDPGSearcher, warmup: int, decay: float) -> None:
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


def remote_env(
    spec: Any,
    budget: dict[str, float],
    reward: Any,
    recorded: list[Evaluation] | None = None,
    fill_budget: bool = False,
) -> PruningEnv:
    """A PruningEnv on a Ray worker, over the task of ``spec`` (a TaskSpec or its object ref);
    ``recorded`` evaluations (a resumed search) are answered from memory."""
    if not isinstance(spec, TaskSpec):
        import ray

        spec = ray.get(spec)
    env = PruningEnv(worker_task(spec), budget, reward=reward, fill_budget=fill_budget)
    env.evaluator.preload(recorded or [])
    return env


def _reward_option(value: Any) -> Any:
    """A registered reward's name (configs) or a callable (the Python API)."""
    if callable(value) or value in REWARDS:
        return value
    raise ValueError(f"unknown reward {value!r}; choose from {sorted(REWARDS)} or a callable")


@register
class DDPGSearcher(Searcher):
    """The AMC agent. ``evaluations`` = episodes (one evaluation each)."""

    name = "ddpg"
    needs_evaluations = True
    defaults: dict[str, Any] = {  # noqa: RUF012
        "algo": "ddpg",  # or td3
        "reward": "acc",
        "warmup_episodes": 100,
        "noise": "truncated_normal",  # normal | none
        "sigma": 0.3,
        "sigma_decay": 0.98,
        "episode_credit": True,
        "baseline": True,
        "baseline_alpha": 0.95,
        # Credit (reward - running mean) / running std over the episodes so far instead of the
        # moving-average baseline (a standardised reward; the baseline options are then unused).
        "standardize": False,
        "bootstrap": False,
        "actor_lr": 1e-4,
        "critic_lr": 1e-3,
        "tau": 0.01,
        "batch_size": 64,
        "gamma": 1.0,
        "net_arch": [300, 300],
        "buffer_size": 100_000,
        "warm_start": None,  # path of a saved agent to continue from
        "save_to": None,  # save the trained agent here
        "device": "cpu",
        # Gradient steps per episode; None: one per layer (per transition), as AMC updates.
        "gradient_steps": None,
        # Store the applied (budget-clipped) action in the replay buffer; False: the proposed
        # one, as AMC's code does (its critic then learns from actions never taken).
        "store_applied": True,
        # Probability that an episode after the warm-up explores around the best policy found
        # so far rather than around the actor's action (0: AMC, always the actor).
        "elite_prob": 0.0,
        # Scale an episode that pruned more than the budget asks towards the dense model until
        # it just meets it, and store those ratios as the episode's actions (False: AMC).
        # Default on: with warmup_prior "uniform", measured on Fashion-MNIST (issue 16; README).
        "fill_budget": True,
        # Warm-up actions: "random" (AMC: uniform over the action range) or "uniform" (the
        # default): a truncated normal of scale ``sigma`` around the uniform policy (every unit
        # at the one ratio that meets the budget), a prior that starts the critic near sensible
        # policies.
        "warmup_prior": "uniform",
        # The actor's starting point: "random" (SB3's initialisation, AMC), "uniform" (fitted to
        # the uniform policy before the search) or "best" (the default: fitted to the best
        # warm-up policy when the warm-up ends): exploration after the warm-up then starts
        # around it. Default chosen by rule on held-out seeds (issue 16; README).
        "actor_start": "best",
    }
    option_types: ClassVar[dict[str, Any]] = {
        "algo": Literal["ddpg", "td3"],
        "reward": Annotated[
            Any,
            AfterValidator(_reward_option),
            WithJsonSchema({"type": "string", "enum": sorted(REWARDS)}),
        ],
        "warmup_episodes": Annotated[int, Field(ge=0, le=1_000_000)],
        "noise": Literal["truncated_normal", "normal", "none"],
        "sigma": Annotated[float, Field(ge=0, le=10)],
        "sigma_decay": Annotated[float, Field(gt=0, le=1)],
        "episode_credit": bool,
        "baseline": bool,
        "baseline_alpha": Annotated[float, Field(ge=0, le=1)],
        "standardize": bool,
        "bootstrap": bool,
        "actor_lr": Annotated[float, Field(gt=0, le=1)],
        "critic_lr": Annotated[float, Field(gt=0, le=1)],
        "tau": Annotated[float, Field(gt=0, le=1)],
        "batch_size": Annotated[int, Field(ge=1, le=65_536)],
        "gamma": Annotated[float, Field(ge=0, le=1)],
        "net_arch": Annotated[
            list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=1, max_length=8)
        ],
        "buffer_size": Annotated[int, Field(ge=1, le=10_000_000)],
        "warm_start": str | Path | None,
        "save_to": str | Path | None,
        "device": Literal["cpu", "cuda", "auto"],
        "gradient_steps": Annotated[int, Field(ge=1, le=10_000)] | None,
        "store_applied": bool,
        "elite_prob": Annotated[float, Field(ge=0, le=1)],
        "fill_budget": bool,
        "warmup_prior": Literal["random", "uniform"],
        "actor_start": Literal["random", "uniform", "best"],
    }

    @classmethod
    def settled(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options in force: the defaults, the given ``options`` over them, and the defaulted
        features that the given options rule out turned off (``fill_budget`` without episode
        credit or applied actions, ``warmup_prior`` with TD3 or a warm start, ``actor_start``
        with a warm start or, for ``"best"``, without warm-up episodes); asked for explicitly,
        those combinations are refused instead."""
        opts = {**cls.defaults, **options}
        if "fill_budget" not in options and not (opts["episode_credit"] and opts["store_applied"]):
            opts["fill_budget"] = False
        fresh_ddpg = opts["algo"] == "ddpg" and opts["warm_start"] is None
        if "warmup_prior" not in options and not fresh_ddpg:
            opts["warmup_prior"] = "random"
        if "actor_start" not in options and (
            opts["warm_start"] is not None or int(opts["warmup_episodes"]) < 1
        ):
            opts["actor_start"] = "random"
        return opts

    @classmethod
    def preflight(cls, options: Mapping[str, Any], ctx: Preflight) -> list[Problem]:
        out = super().preflight(options, ctx)
        opts = cls.settled(options)
        if opts["device"] == "cuda" and not ctx.cuda:
            out.append((("options", cls.name, "device"), "no CUDA device here (use cpu or auto)"))
        if opts["elite_prob"] > 0 and (opts["algo"], opts["noise"]) != ("ddpg", "truncated_normal"):
            out.append((
                ("options", cls.name, "elite_prob"),
                "elite_prob needs algo ddpg and truncated_normal noise",
            ))  # fmt: skip
        if opts["warmup_prior"] != "random" and opts["algo"] != "ddpg":
            out.append((
                ("options", cls.name, "warmup_prior"),
                f"warmup_prior {opts['warmup_prior']!r} needs algo ddpg",
            ))  # fmt: skip
        if opts["warmup_prior"] != "random" and opts["warm_start"] is not None:
            out.append((
                ("options", cls.name, "warmup_prior"),
                "warmup_prior shapes the warm-up, and a warm_start agent has none",
            ))  # fmt: skip
        if opts["actor_start"] != "random" and opts["warm_start"] is not None:
            out.append((
                ("options", cls.name, "actor_start"),
                "actor_start starts a new actor; a warm_start agent brings its own",
            ))  # fmt: skip
        if opts["actor_start"] == "best" and int(opts["warmup_episodes"]) < 1:
            out.append((
                ("options", cls.name, "actor_start"),
                "actor_start 'best' needs warm-up episodes to choose from (warmup_episodes >= 1)",
            ))  # fmt: skip
        if opts["fill_budget"] and not (opts["episode_credit"] and opts["store_applied"]):
            out.append((
                ("options", cls.name, "fill_budget"),
                "fill_budget needs episode_credit and store_applied (the filled ratios are "
                "stored when the episode ends)",
            ))  # fmt: skip
        if opts["standardize"] and not opts["episode_credit"]:
            out.append((
                ("options", cls.name, "standardize"),
                "standardize credits the episode's reward; it needs episode_credit",
            ))  # fmt: skip
        if opts["standardize"] and opts["warm_start"] is not None:
            out.append((
                ("options", cls.name, "standardize"),
                "a warm_start agent keeps the replay buffer settings it was saved with",
            ))  # fmt: skip
        given = sorted({"baseline", "baseline_alpha"} & set(options))
        if opts["standardize"] and given:
            out.append((
                ("options", cls.name, "standardize"),
                f"standardize replaces the moving-average baseline; leave {', '.join(given)} "
                "unset",
            ))  # fmt: skip
        warm = int(opts["warmup_episodes"]) if opts["warm_start"] is None else 0
        if ctx.evaluations is not None and warm >= ctx.evaluations:
            out.append((
                ("options", cls.name, "warmup_episodes"),
                f"the warm-up of {warm} episodes must be below ddpg's {ctx.evaluations} "
                "evaluations; raise evaluations or lower warmup_episodes",
            ))  # fmt: skip
        return out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.options
        explicit = {k: opts[k] for k in kwargs if k in self.defaults}
        opts.update(self.settled(explicit))  # the defaults that explicit options rule out, off
        if opts["algo"] not in ("ddpg", "td3"):
            raise SearchError(f"ddpg option algo must be 'ddpg' or 'td3', got {opts['algo']!r}")
        if opts["noise"] not in ("truncated_normal", "normal", "none"):
            raise SearchError(f"unknown noise {opts['noise']!r}: truncated_normal, normal, none")
        warm = int(opts["warmup_episodes"]) if opts["warm_start"] is None else 0
        assert self.evaluations is not None
        if warm >= self.evaluations:
            raise SearchError(
                f"evaluation budget {self.evaluations} is not larger than the warm-up of "
                f"{warm} episodes; raise evaluations or lower warmup_episodes"
            )
        ctx = Preflight(self.task.space.granularity, self.evaluations, len(self.task.space),
                        torch.cuda.is_available())  # fmt: skip
        for where, message in self.preflight(explicit, ctx)[:1]:  # the checks configs get
            raise SearchError(f"ddpg option {where[-1]}: {message}")
        if opts["reward"] == "loss" and self.task.metric is not None:
            raise SearchError("ddpg option reward: 'loss' needs the cross-entropy, and this "
                              "task scores with its own metric (no loss); use 'acc'")  # fmt: skip
        if opts["warm_start"] is not None and not Path(opts["warm_start"]).is_file():
            raise SearchError(f"warm_start agent not found: {opts['warm_start']}")
        self.warmup = warm
        self.env = PruningEnv(
            self.task, self.budget, reward=opts["reward"], evaluator=self.evaluator,
            fill_budget=opts["fill_budget"],
        )  # fmt: skip
        self.model: DDPG | TD3 | None = None
        self._sub_envs: VecEnv | None = None  # Ray sub-environments, while a search runs
        self._sent_threshold: float | None = None

    def _noise(self) -> ActionNoise | None:
        opts = self.options
        if opts["noise"] == "truncated_normal":
            return TruncatedNormalNoise(opts["sigma"], seed=self.seed)
        if opts["noise"] == "normal":
            return NormalActionNoise(np.zeros(1), np.full(1, 2.0 * opts["sigma"]))
        return None

    def _build(self, vec_env: VecEnv) -> DDPG | TD3:
        opts = self.options
        n = len(self.task.space)
        kwargs: dict[str, Any] = {
            "learning_rate": opts["actor_lr"],
            "buffer_size": opts["buffer_size"],
            "learning_starts": self.warmup * n,
            "batch_size": opts["batch_size"],
            "tau": opts["tau"],
            "gamma": opts["gamma"],
            # One update round per episode. SB3 trains by episode with one env only; with several
            # (in lockstep, episodes of ``n`` steps) every ``n`` steps is the same thing.
            "train_freq": (1, "episode") if vec_env.num_envs == 1 else (n, "step"),
            "gradient_steps": -1 if opts["gradient_steps"] is None else opts["gradient_steps"],
            "action_noise": self._noise(),
            "policy_kwargs": {"net_arch": list(opts["net_arch"])},
            "seed": self.seed,
            "device": opts["device"],
            "verbose": 0,
        }
        max_ratio = self.env.max_ratio if opts["store_applied"] else None
        kwargs["replay_buffer_class"] = AppliedActionBuffer
        kwargs["replay_buffer_kwargs"] = {"max_ratio": max_ratio}
        if opts["episode_credit"]:
            kwargs["replay_buffer_class"] = EpisodeCreditBuffer
            kwargs["replay_buffer_kwargs"] = {
                "baseline_alpha": opts["baseline_alpha"] if opts["baseline"] else None,
                "bootstrap": opts["bootstrap"],
                "max_ratio": max_ratio,
                "standardize": opts["standardize"],
            }
        if opts["warm_start"] is not None:
            cls = AMCDDPG if opts["algo"] == "ddpg" else TD3
            model = cls.load(opts["warm_start"], env=vec_env, device=opts["device"])
            model.action_noise = kwargs["action_noise"]
            model.learning_starts = 0
            return model
        if opts["algo"] == "td3":
            return TD3("MlpPolicy", vec_env, **kwargs)
        model = AMCDDPG("MlpPolicy", vec_env, critic_lr=opts["critic_lr"], **kwargs)
        if opts["elite_prob"] > 0:
            model.elite, model.elite_prob, model.units = self._elite_actions, opts["elite_prob"], n
            model.elite_rng = np.random.default_rng([self.seed, 1])
        if opts["warmup_prior"] == "uniform":
            model.units = n
            model.warmup_centre = self._actions(self._uniform_ratios())
            model.warmup_noise = TruncatedNormalNoise(opts["sigma"], seed=self.seed + 7919)
        return model

    def warmup_done(self) -> None:
        """The warm-up's last episode is recorded: ``actor_start="best"`` fits the actor to the
        best policy found so far."""
        best = self.result.best
        if self.options["actor_start"] == "best" and best is not None:
            self.fit_actor(self.task.ratio_vector(best.ratios))

    def fit_actor(self, ratios: np.ndarray, steps: int = 300, lr: float = 1e-3) -> float:
        """Fit the actor (and its target copy) to the episode that takes ``ratios`` unit by unit
        (behaviour cloning on that episode's observations); returns the final squared error."""
        assert self.model is not None
        actor = self.model.actor
        obs = torch.as_tensor(self.env.observations(ratios), device=self.model.device)
        target = torch.as_tensor(self._actions(ratios), dtype=torch.float32,
                                 device=self.model.device)  # fmt: skip
        optimizer = torch.optim.Adam(actor.parameters(), lr=lr)
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(actor(obs).reshape(-1), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.model.actor_target.load_state_dict(actor.state_dict())
        error = float(loss.detach())
        self.result.info["actor_fit_error"] = error
        return error

    def _uniform_ratios(self) -> np.ndarray:
        """The uniform policy: every unit at the one ratio that meets the budget."""
        return self.budget.uniform(self.cost_ratios, self.env.max_ratio, len(self.task.space))

    def _actions(self, ratios: np.ndarray) -> np.ndarray:
        """The actions that give ``ratios`` (the environment's inverse map, [-1, 1])."""
        return np.clip(2.0 * np.asarray(ratios) / self.env.max_ratio - 1.0, -1.0, 1.0)

    def _elite_actions(self) -> np.ndarray | None:
        """The best policy so far as the actions that give it (one per unit), or None."""
        best = self.result.best
        if best is None:
            return None
        return self._actions(self.task.ratio_vector(best.ratios))

    def episode_done(self, info: dict[str, Any], warmup: bool) -> None:
        """Record a finished episode (its evaluation comes in the episode's last info)."""
        if self.remaining is not None and self.remaining <= 0:
            return
        evaluation = Evaluation.from_dict(info["evaluation"])
        reward = float(self.env.reward_fn(evaluation))
        self.record(evaluation, reward=reward, note="warm-up" if warmup else "")
        # The next episode's policy may be rejected early against the best so far, here and in
        # the Ray sub-environments (told only when the best changes: one round trip each; a
        # restarted sub-environment evaluates in full until the next change).
        threshold = self.reject_below
        self.env.reject_below = threshold
        if self._sub_envs is not None and threshold != self._sent_threshold:
            self._sub_envs.set_attr("reject_below", threshold)
            self._sent_threshold = threshold

    def _vec_env(self) -> VecEnv:
        """One environment here, or one per Ray worker (each in its own actor, holding the
        task once) when the backend is a Ray pool: DDPG then collects that many episodes at
        once."""
        if not isinstance(self.backend, RayBackend):
            return DummyVecEnv([lambda: self.env])
        from autoprune.envs.ray_vec_env import RayVecEnv

        self.backend.release()  # the environment actors need the evaluator actors' CPUs
        make = partial(
            remote_env, self.backend.spec_ref, self.budget.to_dict(), self.options["reward"],
            fill_budget=self.options["fill_budget"],
        )  # fmt: skip
        setup = partial(torch.set_num_threads, self.backend.threads)
        self._sub_envs = RayVecEnv([make] * self.backend.workers, worker_setup=setup)
        self._sent_threshold = None
        return self._sub_envs

    def _search(self) -> None:
        torch.manual_seed(self.seed)
        vec_env = self._vec_env()
        vec_env.seed(self.seed)
        try:
            self.model = self._build(vec_env)
            if self.options["actor_start"] == "uniform":
                self.fit_actor(self._uniform_ratios())
            assert self.evaluations is not None
            # Enough steps for the requested episodes, rounded up to whole rounds of n_envs.
            rounds = -(-self.evaluations // vec_env.num_envs)
            steps = rounds * vec_env.num_envs * len(self.task.space)
            callback = NoiseDecay(self, self.warmup, self.options["sigma_decay"])
            self.model.learn(total_timesteps=steps, callback=callback, reset_num_timesteps=True)
        finally:
            vec_env.close()
            self._sub_envs = None
        self.result.info["n_envs"] = vec_env.num_envs
        if self.options["save_to"] is not None:
            self.save(self.options["save_to"])
        self.result.info["warmup_episodes"] = self.warmup

    def save(self, path: str | Path) -> Path:
        """Save the trained agent (SB3 zip) for a warm start on another budget."""
        if self.model is None:
            raise SearchError("nothing to save: run the search first")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(out)
        return out.with_suffix(".zip") if out.suffix != ".zip" else out
