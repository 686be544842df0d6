"""PruningEnv: layer-by-layer pruning-ratio decisions as a Gymnasium environment (AMC)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from autoprune.envs.rewards import Reward, get_reward
from gymnasium import spaces

from autoprune.budget import Budget
from autoprune.engine.units import UNIT_KINDS
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.task import Task, build_task

FEATURES = (
    "index", "kind", "in_channels", "out_channels", "stride", "kernel", "fmap", "macs",
    "reduced", "rest", "previous_action",
)  # fmt: skip
STATIC = FEATURES[:8]
CLIP_ITERATIONS = 14


class PruningEnv(gym.Env):
    """Choose a pruning ratio for each unit of a network, one unit per step (AMC, ECCV 2018).

    ## Description
    The agent walks the network's units (channel groups, or weight tensors for fine-grained and
    N:M tasks) in network order and picks the fraction of each to remove. When every unit has
    a ratio, the evaluator prunes a copy of the model, recalibrates batch norm and measures
    accuracy on the search split; that result is the episode's reward.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: mapped linearly to a ratio in ``[0, max_ratio]``
    (``max_ratio`` defaults to the task's, 0.8). Before it is taken the ratio is clipped (AMC's
    action clipping) so that the budget stays reachable if every later unit is pruned to
    ``max_ratio``; the ratio actually applied is ``info["ratio"]``. Any action sequence therefore
    ends with a policy that meets the budget.

    ## Observation Space
    ``Box(0, 1, (11,), float32)``, AMC's layer embedding, each feature scaled to [0, 1] over the
    model's units: unit index, unit kind (conv, depthwise conv, linear), input channels, output
    channels, stride, kernel size, input feature-map size, the unit's MACs, the cost already
    removed by earlier decisions, the cost of the units still to come, and the previous action.

    ## Rewards
    0.0 on every step but the last; then ``reward(evaluation)``: ``acc`` (search accuracy; the
    budget is guaranteed by clipping), ``loss`` (minus the search split's cross-entropy),
    ``acc_log_flops`` / ``acc_log_params`` /
    ``acc_log_latency`` (``-error * log(cost ratio)``), or any callable of an
    :class:`~autoprune.evaluate.Evaluation`.

    ## Starting State
    The first unit, nothing pruned yet.

    ## Episode End
    ``terminated=True`` after the last unit; the environment never truncates by itself. The last
    ``info`` holds ``policy`` (ratios by unit name), ``accuracy``, ``loss``, the achieved cost
    ratios (``flops_ratio``, ``params_ratio`` and, for latency budgets, ``latency_ratio_table``) and
    ``eval_seconds``.

    ## Arguments
    ``task`` (a :class:`~autoprune.task.Task`, a config dict / YAML path, or None for the
    embedded default: ResNet-20 on digits, channel, l2), ``budget`` (``"flops=0.5"``,
    ``"flops=0.5,params=0.6"`` or a :class:`~autoprune.budget.Budget`), ``reward``,
    ``max_ratio``, ``evaluator`` (to share one between environments), ``fill_budget`` (an
    episode that pruned more than the budget asks is scaled towards the dense model until it
    just meets it, before it is evaluated: AMC's clipping keeps the budget reachable but never
    gives back what over-pruning left unused). The terminal ``info["applied"]`` holds the
    ratios evaluated, one per unit, for a replay buffer to store.
    """

    metadata = {"render_modes": []}  # noqa: RUF012  (Gymnasium's own convention)
    # Class-level spaces, the Gymnasium way: they do not depend on the model.
    action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)  # type: ignore[misc]
    observation_space = spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)  # type: ignore[misc]

    def __init__(
        self,
        task: Task | Mapping[str, Any] | str | None = None,
        budget: Budget | str | Mapping[str, float] = "flops=0.5",
        reward: str | Reward = "acc",
        max_ratio: float | None = None,
        evaluator: Evaluator | None = None,
        fill_budget: bool = False,
    ) -> None:
        super().__init__()
        self.fill_budget = bool(fill_budget)
        self.reward_name, self.reward_fn = get_reward(reward)  # cheap checks first
        self.task = task if isinstance(task, Task) else build_task(task)  # type: ignore[arg-type]
        if self.reward_name == "loss" and self.task.metric is not None:
            raise ValueError("reward 'loss' needs the cross-entropy, and this task scores with "
                             "its own metric (no loss); use 'acc'")  # fmt: skip
        space = self.task.space
        self.max_ratio = float(space.max_ratio if max_ratio is None else max_ratio)
        if not 0 < self.max_ratio <= space.max_ratio:
            raise ValueError(f"max_ratio must be in (0, {space.max_ratio}], got {self.max_ratio}")
        self.budget = Budget.parse(budget)
        self._metrics = tuple(dict.fromkeys([*self.budget.metrics, "flops", "params"]))
        self._check_budget()
        needs_latency = "latency" in self.budget.metrics or self.reward_name == "acc_log_latency"
        self.evaluator = evaluator or Evaluator(self.task, predict_latency=needs_latency)
        # The searcher's best accuracy so far, for the evaluator's early rejection (None: off).
        self.reject_below: float | None = None
        self._static = self._static_features()
        macs = np.array([u.macs for u in space.units], dtype=np.float64)
        self._rest = (macs.sum() - np.cumsum(macs)) / macs.sum()
        self._n = len(space)
        self._t = 0
        self._ratios = np.zeros(self._n)
        self._prev = 0.0

    # ------------------------------------------------------------- set-up
    def _cost(self, vec: np.ndarray) -> dict[str, float]:
        return self.task.cost_ratios(vec, self._metrics)

    def _check_budget(self) -> None:
        floor = np.full(len(self.task.space), self.max_ratio)
        self.budget.check_reachable(self._cost, floor)

    def _static_features(self) -> np.ndarray:
        rows = np.array(
            [[u.features()[f] for f in STATIC] for u in self.task.space.units], dtype=np.float64
        )
        rows[:, 1] /= max(1, len(UNIT_KINDS) - 1)  # kind: a fixed scale, not the model's span
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        scaled = (rows - lo) / span
        scaled[:, 1] = rows[:, 1]
        return scaled

    # ------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        self._ratios = np.zeros(self._n)
        self._prev = 0.0
        return self._observation(), {"unit": self.task.space.units[0].name}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._t >= self._n:
            raise RuntimeError("step() called after the episode ended; call reset()")
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        proposed = (a + 1.0) / 2.0 * self.max_ratio
        ratio = self._clip(proposed)
        t = self._t
        self._ratios[t] = ratio
        self._prev = ratio / self.max_ratio
        self._t += 1
        info: dict[str, Any] = {
            "unit": self.task.space.units[t].name,
            "proposed": proposed,
            "ratio": ratio,
        }
        if self._t < self._n:
            return self._observation(), 0.0, False, False, info
        evaluation = self._finish()
        info.update(self._terminal_info(evaluation))
        return self._observation(), float(self.reward_fn(evaluation)), True, False, info

    def rollout(self, actions: np.ndarray) -> np.ndarray:
        """The ratio vector an episode of ``actions`` (one per unit) ends with, clipping applied,
        without evaluating it (searchers that evaluate policies in batches use this). The
        environment is left reset."""
        actions = np.asarray(actions, dtype=np.float64).reshape(-1)
        if len(actions) != self._n:
            raise ValueError(f"rollout needs {self._n} actions (one per unit), got {len(actions)}")
        self.reset()
        for a in actions:
            ratio = self._clip((float(np.clip(a, -1.0, 1.0)) + 1.0) / 2.0 * self.max_ratio)
            self._ratios[self._t] = ratio
            self._t += 1
        vec = self._ratios.copy()
        if not self.budget.met_by(self._cost(vec)):  # guard against rounding, as _finish does
            vec = self.task.project(vec, self.budget)
        self.reset()
        return vec

    # ----------------------------------------------------------- internals
    def _clip(self, proposed: float) -> float:
        """AMC's action clipping: the smallest ratio >= proposed that keeps the budget reachable
        with every later unit at max_ratio (bisection; costs are monotone in the ratio)."""
        vec = self._ratios.copy()
        vec[self._t + 1 :] = self.max_ratio
        vec[self._t] = proposed
        if self.budget.met_by(self._cost(vec)):
            return proposed
        lo, hi = proposed, self.max_ratio
        for _ in range(CLIP_ITERATIONS):
            vec[self._t] = (lo + hi) / 2
            if self.budget.met_by(self._cost(vec)):
                hi = vec[self._t]
            else:
                lo = vec[self._t]
        return float(hi)

    def _finish(self) -> Evaluation:
        if not self.budget.met_by(self._cost(self._ratios)):  # guard against rounding
            self._ratios = self.task.project(self._ratios, self.budget)
        elif self.fill_budget:
            self._ratios = self.budget.fill(self._cost, self._ratios)
        return self.evaluator.evaluate(self._ratios, self.reject_below)

    def _terminal_info(self, e: Evaluation) -> dict[str, Any]:
        # A task metric has no loss: None rather than NaN, which never equals itself (Gymnasium's
        # determinism check compares infos) and is not JSON.
        loss = None if math.isnan(e.loss) else e.loss
        evaluation = {**e.to_dict(), "loss": loss}
        info: dict[str, Any] = {
            "policy": dict(e.ratios),
            "accuracy": e.accuracy,
            "loss": loss,
            "flops_ratio": e.flops_ratio,
            "params_ratio": e.params_ratio,
            "eval_seconds": e.seconds.get("total", 0.0),
            "cached": e.cached,
            "evaluation": evaluation,  # everything, for searchers running envs elsewhere
            "applied": self._ratios.tolist(),  # what was evaluated, unit by unit
        }
        if e.latency_ratio_table is not None:
            info["latency_ratio_table"] = e.latency_ratio_table
        return info

    def _observation(self) -> np.ndarray:
        return self._observe(self._t, self._ratios, self._prev)

    def _observe(self, step: int, ratios: np.ndarray, prev: float) -> np.ndarray:
        """The observation before deciding unit ``step`` (``step == n``: after the last), with
        ``ratios[:step]`` decided and ``prev`` the last decision over max_ratio."""
        t = min(step, self._n - 1)
        done = np.array(ratios, dtype=np.float64)
        done[step:] = 0.0
        reduced = 1.0 - self.task.space.cost_ratios(done)["flops"]
        rest = self._rest[t - 1] if step >= self._n else self._rest[t]
        obs = np.concatenate([self._static[t], [reduced, rest, prev]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def observations(self, ratios: np.ndarray) -> np.ndarray:
        """The observation of every step of an episode that takes ``ratios`` unit by unit (as
        given, no clipping), one row per unit; the episode under way is not touched."""
        ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
        if len(ratios) != self._n:
            raise ValueError(f"observations need {self._n} ratios (one per unit), got "
                             f"{len(ratios)}")  # fmt: skip
        prev = np.concatenate([[0.0], ratios[:-1] / self.max_ratio])
        return np.stack([self._observe(t, ratios, prev[t]) for t in range(self._n)])

    @property
    def ratios(self) -> dict[str, float]:
        """Ratios applied so far in this episode, by unit name."""
        return self.task.ratios_dict(self._ratios)
