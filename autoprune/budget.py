"""Resource budgets: ``flops <= 0.25 x original`` and friends, and how to meet them.

A budget holds one or more limits, each a fraction of the dense model's cost: ``flops`` (MACs),
``params`` or ``latency`` (NetAdapt lookup table). Every policy a searcher returns meets it; the
exact projection here is the fallback that guarantees it for any ratio vector.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

METRICS = ("flops", "params", "latency")
CostFn = Callable[[np.ndarray], Mapping[str, float]]
# The one tolerance of a budget: every module that asks "is this ratio within its limit?"
# asks :func:`within`. Cost ratios are quotients of exact counts (MACs, parameters) or of
# timings, so only floating-point noise needs room.
TOLERANCE = 1e-9


def within(value: float, limit: float) -> bool:
    """Whether a cost ratio meets a limit, with the budget's tolerance."""
    return float(value) <= float(limit) + TOLERANCE


def _number(metric: object, value: object) -> float:
    """A limit as a float, or a BudgetError naming the metric and what was given."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BudgetError(
            f"budget {metric}: {value!r} is not a number; write e.g. flops=0.25"
        ) from None


class BudgetError(ValueError):
    """A budget that is malformed or that no policy can meet."""


@dataclass(frozen=True)
class Budget:
    """Upper limits on cost ratios (achieved cost / dense cost), e.g. ``{"flops": 0.5}``."""

    limits: Mapping[str, float]

    def __post_init__(self) -> None:
        if not self.limits:
            raise BudgetError("a budget needs at least one limit, e.g. flops=0.5")
        for metric, value in self.limits.items():
            if metric not in METRICS:
                raise BudgetError(f"unknown budget metric {metric!r}; choose from {METRICS}")
            if not 0 < float(value) <= 1:
                raise BudgetError(f"budget {metric}={value} must be a ratio in (0, 1]")

    @classmethod
    def parse(cls, spec: str | Mapping[str, float] | Budget) -> Budget:
        """``"flops=0.25"``, ``"flops<=0.5,params<=0.6"`` or ``{"flops": 0.25}``."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, Mapping):
            return cls({str(k): _number(k, v) for k, v in spec.items()})
        limits: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"([a-z]+)\s*(?:<=|=|:)\s*([0-9.eE+-]+)", part)
            if not match:
                raise BudgetError(f"cannot read budget {part!r}; write e.g. flops=0.25")
            if match.group(1) in limits:
                raise BudgetError(
                    f"budget {spec!r} limits {match.group(1)} twice; give each metric once"
                )
            limits[match.group(1)] = _number(match.group(1), match.group(2))
        return cls(limits)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.limits)

    def __str__(self) -> str:
        return ",".join(f"{k}<={v:g}" for k, v in self.limits.items())

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.limits.items()}

    def met_by(self, costs: Mapping[str, float]) -> bool:
        """Whether achieved cost ratios satisfy every limit."""
        return all(within(costs[m], v) for m, v in self.limits.items())

    def excess(self, costs: Mapping[str, float]) -> float:
        """How far the worst limit is exceeded (<= 0 when met)."""
        return max(costs[m] - v for m, v in self.limits.items())

    def check_reachable(self, cost_fn: CostFn, max_ratios: np.ndarray) -> None:
        """Raise :class:`BudgetError` naming the smallest reachable ratio if even the most pruned
        policy (every unit at max_ratio) misses the budget."""
        floor = cost_fn(max_ratios)
        for metric, limit in self.limits.items():
            if not within(floor[metric], limit):
                raise BudgetError(
                    f"budget {metric}<={limit:g} is unreachable: the smallest reachable is "
                    f"{metric}={floor[metric]:.4f}, with every unit pruned to ratio "
                    f"{float(np.max(max_ratios)):.3g} (raise the budget or max_ratio)"
                )

    def fill(self, cost_fn: CostFn, vec: np.ndarray, steps: int = 30) -> np.ndarray:
        """A ratio vector that prunes more than the budget asks, scaled towards the dense model
        until it just meets the budget (the direction, which units are pruned most, is kept);
        a vector that misses the budget, or is already on its boundary, comes back unchanged."""
        vec = np.asarray(vec, dtype=np.float64)
        if not self.met_by(cost_fn(vec)):
            return vec
        lo, hi = 0.0, 1.0  # the smallest scale of vec that still meets the budget
        for _ in range(steps):
            mid = (lo + hi) / 2
            if self.met_by(cost_fn(vec * mid)):
                hi = mid
            else:
                lo = mid
        return vec * hi

    def project(
        self, cost_fn: CostFn, ratios: np.ndarray, max_ratios: np.ndarray, iters: int = 40
    ) -> np.ndarray:
        """The ratio vector closest along ``ratios -> max_ratios`` that meets the budget.

        Ratios already within budget come back unchanged; otherwise every unit moves the same
        fraction ``t`` of the way to its maximum, with ``t`` found by bisection (costs are
        monotone in ``t``), so the result meets the budget whenever the budget is reachable.
        """
        ratios = np.asarray(ratios, dtype=np.float64)
        if self.met_by(cost_fn(ratios)):
            return ratios
        lo, hi = 0.0, 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            if self.met_by(cost_fn(ratios + mid * (max_ratios - ratios))):
                hi = mid
            else:
                lo = mid
        return ratios + hi * (max_ratios - ratios)

    def uniform(self, cost_fn: CostFn, max_ratio: float, n: int, iters: int = 40) -> np.ndarray:
        """The smallest single ratio for every unit that meets the budget (bisection)."""
        return self.project(cost_fn, np.zeros(n), np.full(n, max_ratio), iters)
