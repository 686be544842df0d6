"""``evolution``: evolutionary search over per-unit ratio vectors (MetaPruning, ICCV 2019).

The strongest non-learned baseline in the literature on automatic ratio search: a population of
policies is scored, the best ``parents`` of everything evaluated so far breed the next
generation, half of it by crossover (each unit's ratio from one of two parents) and half by
mutation (a few units' ratios moved by Gaussian noise), and every child is projected *onto* the
budget: raised along the way to the maximum ratios when it misses the budget, lowered towards
the dense model when it prunes more than the budget asks (a child that removes more than it
must is never worth its accuracy).

- The first generation is drawn like ``random``'s policies: random actions through the RL
  agent's environment and AMC's action clipping, then projected onto the budget.
- Each generation is evaluated in one call to the backend, so a Ray pool scores its children in
  parallel; serial and Ray runs of the same seed give the same history.
- Early rejection: a child whose optimistic bound falls below the worst current parent cannot
  become a parent, so it is scored on a first slice only (flagged ``partial``; never the best).
- Children equal to a policy already evaluated are drawn again (up to a few tries), so the
  budget of evaluations is spent on new policies.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from autoprune.agents.base import Record, Searcher
from autoprune.agents.options import SearchOptions, conflict
from autoprune.agents.registry import register
from autoprune.envs.pruning_env import PruningEnv
from pydantic import Field, model_validator

_REDRAWS = 20  # tries to draw a child that was not evaluated yet


class EvolutionOptions(SearchOptions):
    """Options of ``evolution``.

    MetaPruning used a population of 50, the top 10 as parents, 25 children by crossover and
    25 by mutation (probability 0.1 per gene) for 20 generations: 1,000 evaluations. Scaled to
    the 150-300 evaluations a search here spends: 20 per generation, the top 5 as parents.
    """

    population: int = Field(20, ge=2, le=100_000, description="policies per generation")
    parents: int = Field(5, ge=1, le=100_000, description="the best so far, that breed")
    crossover: float = Field(
        0.5, ge=0, le=1, description="fraction of each generation bred by crossover; the rest "
        "by mutation",
    )  # fmt: skip
    mutation_prob: float = Field(
        0.1, ge=0, le=1, description="per unit (at least one unit of every mutant moves)"
    )
    mutation_sigma: float = Field(
        0.1, gt=0, le=1, description="Gaussian step, as a fraction of max_ratio"
    )

    @model_validator(mode="after")
    def _parents_within_population(self) -> Self:
        if self.parents > self.population:
            message = f"parents ({self.parents}) cannot exceed the population ({self.population})"
            raise conflict(self, "parents", message)
        return self


@register
class EvolutionSearcher(Searcher):
    """Evolutionary search (see the module docstring). Needs ``evaluations``."""

    name = "evolution"
    needs_evaluations = True
    options_type = EvolutionOptions
    options: EvolutionOptions

    # ------------------------------------------------------------ the search
    def _search(self) -> None:
        assert self.evaluations is not None  # needs_evaluations: checked by the base class
        o = self.options
        self.max_ratio = float(self.task.space.max_ratio)
        self.seen: set[bytes] = set()
        env = PruningEnv(self.task, self.budget, evaluator=self.evaluator)
        units = len(self.task.space)
        first = min(o.population, self.evaluations)
        children = [
            self._fresh(lambda: env.rollout(self.rng.uniform(-1.0, 1.0, size=units)))
            for _ in range(first)
        ]
        generation = 0
        while children:
            threshold = self._worst_parent()
            for evaluation in self.backend.map(children, threshold):
                self.record(evaluation, note=f"generation {generation}")
            generation += 1
            size = min(o.population, self.remaining or 0)
            children = self._breed(size)
        self.result.info["generations"] = generation

    def _parents(self) -> list[Record]:
        """The best fully evaluated, within-budget policies so far (elitist: from every
        generation)."""
        full = [r for r in self.result.history if r.meets_budget and not r.partial]
        full.sort(key=lambda r: (-r.accuracy, r.index))
        return full[: self.options.parents]

    def _worst_parent(self) -> float | None:
        parents = self._parents()
        if len(parents) < self.options.parents:
            return None
        return parents[-1].accuracy

    def _breed(self, size: int) -> list[np.ndarray]:
        parents = [self.task.ratio_vector(r.ratios) for r in self._parents()]
        if not parents or size <= 0:
            return []
        n_cross = round(size * self.options.crossover) if len(parents) > 1 else 0
        out = [self._fresh(lambda: self._crossover(parents)) for _ in range(n_cross)]
        out += [self._fresh(lambda: self._mutate(parents)) for _ in range(size - n_cross)]
        return out

    def _crossover(self, parents: list[np.ndarray]) -> np.ndarray:
        a, b = self.rng.choice(len(parents), size=2, replace=False)
        take = self.rng.random(len(parents[a])) < 0.5
        return np.where(take, parents[a], parents[b])

    def _mutate(self, parents: list[np.ndarray]) -> np.ndarray:
        child = parents[int(self.rng.integers(len(parents)))].copy()
        moved = self.rng.random(len(child)) < self.options.mutation_prob
        moved[int(self.rng.integers(len(child)))] = True  # every mutant changes somewhere
        step = self.rng.normal(0.0, self.options.mutation_sigma * self.max_ratio, len(child))
        child[moved] += step[moved]
        return np.clip(child, 0.0, self.max_ratio)

    def _fresh(self, draw: Any) -> np.ndarray:
        """A child projected onto the budget that was not evaluated (nor drawn) before, if one
        turns up within a few tries."""
        for _ in range(_REDRAWS):
            vec = self._onto_budget(draw())
            key = self.task.space.removed_counts(vec).tobytes()
            if key not in self.seen:
                break
        self.seen.add(key)
        return vec

    def _onto_budget(self, vec: np.ndarray) -> np.ndarray:
        """The policy on the budget's boundary along ``vec``'s direction: projected up when it
        misses the budget, scaled down towards the dense model when it prunes more than asked."""
        vec = np.clip(np.asarray(vec, dtype=np.float64), 0.0, self.max_ratio)
        if not self.budget.met_by(self.cost_ratios(vec)):
            return self.project(vec)
        return self.budget.fill(self.cost_ratios, vec)
