"""``ddpg``: the AMC agent, stable-baselines3 DDPG on PruningEnv (He et al., ECCV 2018).

AMC's recipe is added through SB3's extension points, without forking SB3 (the extensions are
:mod:`autoprune.agents.amc`; this module holds the searcher and its options, :class:`DDPGOptions`):

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

from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Self, cast

import numpy as np
import torch
from autoprune.agents.amc import (
    AMCDDPG,
    AppliedActionBuffer,
    EpisodeCreditBuffer,
    NoiseDecay,
    TruncatedNormalNoise,
    quiet_logger,
)
from autoprune.agents.base import Preflight, Problem, Searcher, SearchError
from autoprune.agents.options import SearchOptions, conflict
from autoprune.agents.registry import register
from autoprune.envs import PruningEnv
from autoprune.envs.rewards import REWARDS
from pydantic import AfterValidator, Field, WithJsonSchema, model_validator
from stable_baselines3 import DDPG, TD3
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from autoprune.budget import Budget
from autoprune.evaluate import Evaluation
from autoprune.parallel import RayBackend, TaskSpec, worker_task
from autoprune.task import Task


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


Reward = Annotated[  # a registered reward's name (configs) or a callable (the Python API)
    Any,
    AfterValidator(_reward_option),
    WithJsonSchema({"type": "string", "enum": sorted(REWARDS)}),
]
Positive = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class DDPGOptions(SearchOptions):
    """Options of ``ddpg``: AMC's agent, its defaults and the switches that turn each piece off.

    A default that the given options rule out steps aside (``fill_budget`` without episode
    credit or applied actions, ``warmup_prior`` with TD3 or a warm start, ``actor_start`` with
    a warm start or, for ``"best"``, without warm-up episodes); asked for explicitly, such a
    combination is refused, naming the option.
    """

    algo: Literal["ddpg", "td3"] = "ddpg"
    reward: Reward = "acc"
    warmup_episodes: int = Field(100, ge=0, le=1_000_000)
    noise: Literal["truncated_normal", "normal", "none"] = "truncated_normal"
    sigma: float = Field(0.3, ge=0, le=10)
    sigma_decay: float = Field(0.98, gt=0, le=1)
    episode_credit: bool = True
    baseline: bool = True
    baseline_alpha: Fraction = 0.95
    # Credit (reward - running mean) / running std over the episodes so far instead of the
    # moving-average baseline (a standardised reward; the baseline options are then unused).
    standardize: bool = False
    bootstrap: bool = False
    actor_lr: Positive = 1e-4
    critic_lr: Positive = 1e-3
    tau: Positive = 0.01
    batch_size: int = Field(64, ge=1, le=65_536)
    gamma: Fraction = 1.0
    net_arch: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [300, 300], min_length=1, max_length=8
    )
    buffer_size: int = Field(100_000, ge=1, le=10_000_000)
    warm_start: str | Path | None = None  # path of a saved agent to continue from
    save_to: str | Path | None = None  # save the trained agent here
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Gradient steps per episode; None: one per layer (per transition), as AMC updates.
    gradient_steps: Annotated[int, Field(ge=1, le=10_000)] | None = None
    # Store the applied (budget-clipped) action in the replay buffer; False: the proposed
    # one, as AMC's code does (its critic then learns from actions never taken).
    store_applied: bool = True
    # Probability that an episode after the warm-up explores around the best policy found
    # so far rather than around the actor's action (0: AMC, always the actor).
    elite_prob: Fraction = 0.0
    # Scale an episode that pruned more than the budget asks towards the dense model until
    # it just meets it, and store those ratios as the episode's actions (False: AMC).
    # Default on: with warmup_prior "uniform", measured on Fashion-MNIST (issue 16; README).
    fill_budget: bool = True
    # Warm-up actions: "random" (AMC: uniform over the action range) or "uniform" (the
    # default): a truncated normal of scale ``sigma`` around the uniform policy (every unit
    # at the one ratio that meets the budget), a prior that starts the critic near sensible
    # policies.
    warmup_prior: Literal["random", "uniform"] = "uniform"
    # The actor's starting point: "random" (SB3's initialisation, AMC), "uniform" (fitted to
    # the uniform policy before the search) or "best" (the default: fitted to the best
    # warm-up policy when the warm-up ends): exploration after the warm-up then starts
    # around it. Default chosen by rule on held-out seeds (issue 16; README).
    actor_start: Literal["random", "uniform", "best"] = "best"

    @model_validator(mode="after")
    def _settle_then_refuse(self) -> Self:
        self._settle()
        for option, message in self._conflicts():
            raise conflict(self, option, message)
        return self

    def _settle(self) -> None:
        """Turn off the defaulted features that the given options rule out."""
        given = self.model_fields_set
        off: dict[str, Any] = {}
        if "fill_budget" not in given and not (self.episode_credit and self.store_applied):
            off["fill_budget"] = False
        fresh_ddpg = self.algo == "ddpg" and self.warm_start is None
        if "warmup_prior" not in given and not fresh_ddpg:
            off["warmup_prior"] = "random"
        if "actor_start" not in given and (self.warm_start is not None or self.warmup_episodes < 1):
            off["actor_start"] = "random"
        self.settle(**off)

    def _conflicts(self) -> Iterator[tuple[str, str]]:
        """The combinations that cannot run, as (option, message)."""
        if self.elite_prob > 0 and (self.algo, self.noise) != ("ddpg", "truncated_normal"):
            yield "elite_prob", "elite_prob needs algo ddpg and truncated_normal noise"
        if self.warmup_prior != "random" and self.algo != "ddpg":
            yield "warmup_prior", f"warmup_prior {self.warmup_prior!r} needs algo ddpg"
        warm_start = self.warm_start is not None
        if self.warmup_prior != "random" and warm_start:
            yield "warmup_prior", "warmup_prior shapes the warm-up, and a warm_start agent has none"
        if self.actor_start != "random" and warm_start:
            yield "actor_start", "actor_start starts a new actor; a warm_start agent brings its own"
        if self.actor_start == "best" and self.warmup_episodes < 1:
            yield "actor_start", ("actor_start 'best' needs warm-up episodes to choose from "
                                  "(warmup_episodes >= 1)")  # fmt: skip
        if self.fill_budget and not (self.episode_credit and self.store_applied):
            yield "fill_budget", ("fill_budget needs episode_credit and store_applied (the "
                                  "filled ratios are stored when the episode ends)")  # fmt: skip
        yield from self._standardize_conflicts()

    def _standardize_conflicts(self) -> Iterator[tuple[str, str]]:
        if not self.standardize:
            return
        if not self.episode_credit:
            yield "standardize", "standardize credits the episode's reward; it needs episode_credit"
        if self.warm_start is not None:
            yield (
                "standardize",
                "a warm_start agent keeps the replay buffer settings it was saved with",
            )
        given = sorted({"baseline", "baseline_alpha"} & self.model_fields_set)
        if given:
            yield "standardize", (f"standardize replaces the moving-average baseline; leave "
                                  f"{', '.join(given)} unset")  # fmt: skip

    @property
    def warmup(self) -> int:
        """Warm-up episodes in force: none for a warm-started agent."""
        return self.warmup_episodes if self.warm_start is None else 0


@register
class DDPGSearcher(Searcher):
    """The AMC agent. ``evaluations`` = episodes (one evaluation each)."""

    name = "ddpg"
    needs_evaluations = True
    options_type = DDPGOptions
    options: DDPGOptions

    def __init__(
        self, task: Task, budget: Budget | str | Mapping[str, float], **kwargs: Any
    ) -> None:
        super().__init__(task, budget, **kwargs)
        opts = self.options
        self.warmup = opts.warmup
        self.env = PruningEnv(
            self.task, self.budget, reward=opts.reward, evaluator=self.evaluator,
            fill_budget=opts.fill_budget,
        )  # fmt: skip
        self.model: DDPG | TD3 | None = None
        self._sub_envs: VecEnv | None = None  # Ray sub-environments, while a search runs
        self._sent_threshold: float | None = None

    @classmethod
    def preflight(cls, options: SearchOptions | Mapping[str, Any], ctx: Preflight) -> list[Problem]:
        out = super().preflight(options, ctx)
        opts = cast(DDPGOptions, cls.typed_options(options))
        if opts.device == "cuda" and not ctx.cuda:
            out.append((("options", cls.name, "device"), "no CUDA device here (use cpu or auto)"))
        if ctx.evaluations is not None and opts.warmup >= ctx.evaluations:
            out.append((
                ("options", cls.name, "warmup_episodes"),
                f"the warm-up of {opts.warmup} episodes must be below ddpg's {ctx.evaluations} "
                "evaluations; raise evaluations or lower warmup_episodes",
            ))  # fmt: skip
        return out

    def check_task(self) -> None:
        opts = self.options
        assert self.evaluations is not None  # needs_evaluations: checked by the base class
        if opts.warmup >= self.evaluations:
            raise SearchError(
                f"evaluation budget {self.evaluations} is not larger than the warm-up of "
                f"{opts.warmup} episodes; raise evaluations or lower warmup_episodes"
            )
        super().check_task()  # preflight: the device
        if opts.reward == "loss" and self.task.metric is not None:
            raise SearchError("ddpg option reward: 'loss' needs the cross-entropy, and this "
                              "task scores with its own metric (no loss); use 'acc'")  # fmt: skip
        if opts.warm_start is not None and not Path(opts.warm_start).is_file():
            raise SearchError(f"warm_start agent not found: {opts.warm_start}")

    def _noise(self) -> ActionNoise | None:
        opts = self.options
        if opts.noise == "truncated_normal":
            return TruncatedNormalNoise(opts.sigma, seed=self.seed)
        if opts.noise == "normal":
            return NormalActionNoise(np.zeros(1), np.full(1, 2.0 * opts.sigma))
        return None

    def _build(self, vec_env: VecEnv) -> DDPG | TD3:
        opts = self.options
        n = len(self.task.space)
        kwargs: dict[str, Any] = {
            "learning_rate": opts.actor_lr,
            "buffer_size": opts.buffer_size,
            "learning_starts": self.warmup * n,
            "batch_size": opts.batch_size,
            "tau": opts.tau,
            "gamma": opts.gamma,
            # One update round per episode. SB3 trains by episode with one env only; with several
            # (in lockstep, episodes of ``n`` steps) every ``n`` steps is the same thing.
            "train_freq": (1, "episode") if vec_env.num_envs == 1 else (n, "step"),
            "gradient_steps": -1 if opts.gradient_steps is None else opts.gradient_steps,
            "action_noise": self._noise(),
            "policy_kwargs": {"net_arch": list(opts.net_arch)},
            "seed": self.seed,
            "device": opts.device,
            "verbose": 0,
        }
        max_ratio = self.env.max_ratio if opts.store_applied else None
        kwargs["replay_buffer_class"] = AppliedActionBuffer
        kwargs["replay_buffer_kwargs"] = {"max_ratio": max_ratio}
        if opts.episode_credit:
            kwargs["replay_buffer_class"] = EpisodeCreditBuffer
            kwargs["replay_buffer_kwargs"] = {
                "baseline_alpha": opts.baseline_alpha if opts.baseline else None,
                "bootstrap": opts.bootstrap,
                "max_ratio": max_ratio,
                "standardize": opts.standardize,
            }
        if opts.warm_start is not None:
            cls = AMCDDPG if opts.algo == "ddpg" else TD3
            model = cls.load(opts.warm_start, env=vec_env, device=opts.device)
            model.action_noise = kwargs["action_noise"]
            model.learning_starts = 0
            return model
        if opts.algo == "td3":
            return TD3("MlpPolicy", vec_env, **kwargs)
        model = AMCDDPG("MlpPolicy", vec_env, critic_lr=opts.critic_lr, **kwargs)
        if opts.elite_prob > 0:
            model.elite, model.elite_prob, model.units = self._elite_actions, opts.elite_prob, n
            model.elite_rng = np.random.default_rng([self.seed, 1])
        if opts.warmup_prior == "uniform":
            model.units = n
            model.warmup_centre = self._actions(self._uniform_ratios())
            model.warmup_noise = TruncatedNormalNoise(opts.sigma, seed=self.seed + 7919)
        return model

    def warmup_done(self) -> None:
        """The warm-up's last episode is recorded: ``actor_start="best"`` fits the actor to the
        best policy found so far."""
        best = self.result.best
        if self.options.actor_start == "best" and best is not None:
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
            remote_env, self.backend.spec_ref, self.budget.to_dict(), self.options.reward,
            fill_budget=self.options.fill_budget,
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
            self.model.set_logger(quiet_logger())  # no SB3-<date> folder in the temp directory
            if self.options.actor_start == "uniform":
                self.fit_actor(self._uniform_ratios())
            assert self.evaluations is not None
            # Enough steps for the requested episodes, rounded up to whole rounds of n_envs.
            rounds = -(-self.evaluations // vec_env.num_envs)
            steps = rounds * vec_env.num_envs * len(self.task.space)
            callback = NoiseDecay(self, self.warmup, self.options.sigma_decay)
            self.model.learn(total_timesteps=steps, callback=callback, reset_num_timesteps=True)
        finally:
            vec_env.close()
            self._sub_envs = None
        self.result.info["n_envs"] = vec_env.num_envs
        if self.options.save_to is not None:
            self.save(self.options.save_to)
        self.result.info["warmup_episodes"] = self.warmup

    def save(self, path: str | Path) -> Path:
        """Save the trained agent (SB3 zip) for a warm start on another budget."""
        if self.model is None:
            raise SearchError("nothing to save: run the search first")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(out)
        return out.with_suffix(".zip") if out.suffix != ".zip" else out
