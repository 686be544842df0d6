"""Reward functions of the pruning environment (AMC, He et al. 2018), behind a registry.

Each reward is a small function of the terminal evaluation. Use ``acc`` (or ``loss``, minus the
search split's cross-entropy) with a hard budget (budget-constrained search: the budget is
guaranteed by action clipping, so the reward only has to rank accuracy) and the ``acc_log_*``
rewards for accuracy-guaranteed search, where the agent also gains from removing more cost:
``-error * log(cost)`` (AMC's R_FLOPs, with the cost as an absolute count above 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from autoprune.evaluate import Evaluation

Reward = Callable[[Evaluation], float]
REWARDS: dict[str, Reward] = {}


def register(name: str) -> Callable[[Reward], Reward]:
    def wrap(fn: Reward) -> Reward:
        REWARDS[name] = fn
        return fn

    return wrap


@register("acc")
def acc(e: Evaluation) -> float:
    """Accuracy on the search split (AMC's acc_reward)."""
    return float(e.accuracy)


@register("loss")
def loss(e: Evaluation) -> float:
    """Minus the cross-entropy on the search split: the quantity automatic ratio search
    minimises in the MIT 6.5940 framing, smoother than top-1 accuracy on a finite split (it
    moves with every image's confidence, not only with the ones that change class)."""
    if math.isnan(e.loss):
        raise ValueError("reward 'loss' needs the search split's loss, which a task metric "
                         "does not give; use reward 'acc'")  # fmt: skip
    return -float(e.loss)


def _log_cost(error: float, cost: float | None, name: str) -> float:
    """AMC's ``-error * log(cost)``, on a cost above 1 so that the reward rises with accuracy
    and falls with cost. (On a ratio of the dense cost, whose log is negative, it would reward
    error: a chance-level model at a quarter of the FLOPs would beat a perfect dense one.)"""
    if cost is None:
        raise ValueError(f"reward needs the {name}, which this evaluation lacks")
    return float(-error * math.log(max(cost, 1.0 + 1e-9)))


@register("acc_log_flops")
def acc_log_flops(e: Evaluation) -> float:
    """-error * log(MACs): rewards both accuracy and a smaller model (AMC's R_FLOPs, on the
    absolute count as in the paper)."""
    return _log_cost(1.0 - e.accuracy, e.macs, "MAC count")


@register("acc_log_params")
def acc_log_params(e: Evaluation) -> float:
    """-error * log(parameters)."""
    return _log_cost(1.0 - e.accuracy, e.params, "parameter count")


@register("acc_log_latency")
def acc_log_latency(e: Evaluation) -> float:
    """-error * log(latency in thousandths of the dense model's): the lookup table predicts a
    ratio, and any unit that keeps the cost above 1 gives the same ranking trade-off."""
    ratio = e.latency_ratio_table
    return _log_cost(1.0 - e.accuracy, None if ratio is None else 1000.0 * ratio, "latency")


def get_reward(reward: str | Reward) -> tuple[str, Reward]:
    """A registered reward by name, or a user's callable (name taken from the function)."""
    if callable(reward):
        return getattr(reward, "__name__", "custom"), reward
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; choose from {sorted(REWARDS)} or a callable")
    return reward, REWARDS[reward]
