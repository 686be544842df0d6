"""NetAdapt (Yang et al., ECCV 2018): greedy, resource-driven pruning with weights carried over.

Each iteration asks for a little less resource than the current model uses (``r0`` of the dense
cost, shrinking by ``decay`` per iteration). For every unit it proposes the smallest extra cut of
that unit alone that reaches the target, prunes the *current* model (not the dense one) to each
proposal, fine-tunes it briefly (``finetune_batches``), recalibrates batch norm and measures
accuracy on the search split. The best proposal becomes the current model and ratio vector, and
the next iteration starts from its weights. It stops when the budget is met.

Resources are the task's analytic costs (FLOPs, params) or its latency lookup table, as in the
paper's empirical measurements. Proposals of one iteration are independent of each other: each
starts from the same current model and seeds its fine-tune from (seed, iteration, unit), and the
per-proposal work is the module-level :func:`run_proposal`, so they can run in parallel.
"""

from __future__ import annotations

import copy
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from autoprune.agents.base import Searcher, SearchError
from autoprune.agents.options import SearchOptions
from autoprune.agents.registry import register
from pydantic import Field
from torch import nn

from autoprune.apply import _relative
from autoprune.engine.criteria import CriterionContext, compute_scores
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.evaluate import Evaluation
from autoprune.parallel import policy_text
from autoprune.task import CRITERION_SAMPLES, Task
from autoprune.training import fine_tune

Selection = Literal["accuracy", "drop_per_cost"]  # how a proposal is chosen
MAX_HALVINGS = 30  # target reduction halved at most this often before giving up
FINETUNE_LR = 0.01
FINETUNE_BATCH_SIZE = 64
_TOL = 1e-12


# ------------------------------------------------------------ per-proposal work (plain inputs)


@dataclass
class Trace:
    """The pruning space and criterion ranking of one (already pruned) model: traced once per
    iteration and shared by all of its proposals."""

    space: PruningSpace
    ranking: Ranking


@dataclass
class Proposal:
    """One proposal's outcome: its evaluation and its pruned, fine-tuned model."""

    evaluation: Evaluation
    model: nn.Module


def trace_model(task: Task, model: nn.Module) -> Trace:
    """Trace a model (torch-pruning DepGraph) and rank its channels with the task's criterion on
    its current weights, as :func:`autoprune.apply._prune_step` does."""
    cfg = task.config
    space = task.space_for(model)
    x, y = task.data.subset("search", CRITERION_SAMPLES, seed=cfg.seed)
    scores = compute_scores(cfg.criterion, CriterionContext(model, space, x, y, seed=cfg.seed))
    return Trace(space, Ranking.from_scores(space, scores))


def proposal_seed(seed: int, iteration: int, unit: int) -> int:
    """The fine-tune seed of one proposal: independent of every other proposal's."""
    return int(np.random.SeedSequence([seed, iteration, unit]).generate_state(1)[0])


def measure(
    task: Task,
    model: nn.Module,
    vec: np.ndarray,
    metrics: Sequence[str] = ("flops", "params"),
    seconds: Mapping[str, float] | None = None,
) -> Evaluation:
    """Judge a model like the evaluator does: recalibrate batch norm on the evaluator's training
    sample (EagleEye), then accuracy and loss on the search split; costs of ``vec`` (analytic)."""
    t0 = time.perf_counter()
    task.recalibrate(model)
    t1 = time.perf_counter()
    acc, loss = task.score(model)
    t2 = time.perf_counter()
    latency = task.cost_ratios(vec, ("latency",))["latency"] if "latency" in metrics else None
    timing = {**(seconds or {}), "recalibrate": t1 - t0, "accuracy": t2 - t1}
    timing["total"] = sum(timing.values())
    return Evaluation.of(task, vec, acc, loss, timing, latency)


def run_proposal(
    task: Task,
    model: nn.Module,
    base_vec: np.ndarray,
    proposal_vec: np.ndarray,
    finetune_batches: int,
    seed: int,
    metrics: Sequence[str] = ("flops", "params"),
    trace: Trace | None = None,
) -> Proposal:
    """Prune a copy of ``model`` (already pruned to ``base_vec``) further to ``proposal_vec``
    (ratios of the dense model), fine-tune it ``finetune_batches`` batches, and judge it.

    ``model`` itself is never changed. ``trace`` is :func:`trace_model` of ``model``, shared by
    the proposals of one iteration (computed here when missing, e.g. on a remote worker).
    """
    if np.any(task.space.removed_counts(proposal_vec) < task.space.removed_counts(base_vec)):
        raise ValueError("a proposal may only remove more channels than its base")
    t0 = time.perf_counter()
    trace = trace or trace_model(task, model)
    target = _relative(trace.space, task, proposal_vec)
    pruned = prune_model(model, trace.space, trace.ranking, target)
    t1 = time.perf_counter()
    if finetune_batches > 0:
        fine_tune(
            pruned,
            task.data,
            epochs=1,
            lr=FINETUNE_LR,
            batch_size=FINETUNE_BATCH_SIZE,
            device=task.config.device,
            max_batches=finetune_batches,
            seed=seed,
        )
    t2 = time.perf_counter()
    timing = {"prune": t1 - t0, "finetune": t2 - t1}
    return Proposal(measure(task, pruned, proposal_vec, metrics, timing), pruned)


_TRACES: dict[str, tuple[nn.Module, Trace]] = {}  # per process: the current iteration's


def iteration_proposal(
    task: Task,
    key: str,
    model: nn.Module,
    base_vec: np.ndarray,
    proposal_vec: np.ndarray,
    finetune_batches: int,
    seed: int,
    metrics: Sequence[str],
) -> Proposal:
    """:func:`run_proposal` for one proposal of iteration ``key``, on whichever process runs it
    (a backend worker): the model of the iteration is traced once per process and reused by the
    iteration's other proposals there (``model`` is then the same weights, already traced)."""
    if key not in _TRACES:
        _TRACES.clear()
        _TRACES[key] = (model, trace_model(task, model))
    model, trace = _TRACES[key]
    return run_proposal(task, model, base_vec, proposal_vec, finetune_batches, seed, metrics, trace)


# ------------------------------------------------------------ resource targets


def smallest_cut(
    task: Task,
    vec: np.ndarray,
    unit: int,
    step: int,
    meets: Callable[[np.ndarray], bool],
) -> np.ndarray | None:
    """The ratio vector that cuts ``unit`` alone by the fewest ``step``-channel steps (up to
    max_ratio) so that ``meets(vec)`` holds; None when even max_ratio does not (costs are
    monotone in the cut, so bisection over the number of steps finds it)."""
    space = task.space
    size = space.units[unit].size
    removed = int(space.removed_counts(vec)[unit])
    most = math.floor(space.max_ratio * size + 1e-9)
    steps = -(-(most - removed) // step)

    def cut(k: int) -> np.ndarray:
        trial = vec.copy()
        trial[unit] = min(removed + k * step, most) / size
        return trial

    if steps <= 0 or not meets(cut(steps)):
        return None
    lo, hi = 0, steps  # meets(cut(lo)) is False: the base misses the target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(cut(mid)):
            hi = mid
        else:
            lo = mid
    return space.achieved_ratios(cut(hi))


# ------------------------------------------------------------ the searcher


@dataclass
class _State:
    """Where the search stands: the ratio vector (of the dense model) and its model."""

    vec: np.ndarray
    model: nn.Module
    accuracy: float | None = None


class NetAdaptOptions(SearchOptions):
    """Options of ``netadapt`` (see :class:`NetAdaptSearcher`). The defaults were measured on
    the default task (experiments/bench_netadapt.py): r0 0.07 / decay 0.97 takes 88 evaluations
    where 0.02 / 0.98 took 530, at the same test accuracy after fine-tuning."""

    r0: float = Field(0.07, gt=0, le=1, description="first iteration's reduction")
    decay: float = Field(0.97, gt=0, le=1, description="reduction multiplier per iteration")
    finetune_batches: int = Field(10, ge=0, le=1_000_000, description="per proposal")
    long_finetune_batches: int = Field(0, ge=0, le=10_000_000, description="the final model's")
    select: Selection = "accuracy"
    round_to: int | None = Field(
        None, ge=1, le=4096, description="channels per step (None: the task's round_to)"
    )


@register
class NetAdaptSearcher(Searcher):
    """NetAdapt (Yang et al., ECCV 2018): per iteration, the best single-unit cut that removes
    ``r0 * decay**i`` of the dense cost, fine-tuned briefly; weights carry across iterations.

    Options: ``r0`` (first iteration's reduction, a fraction of the dense cost of each budget
    metric not yet met), ``decay`` (reduction multiplier per iteration), ``finetune_batches``
    (short-term fine-tune of every proposal, batch 64, lr 0.01), ``long_finetune_batches``
    (long-term fine-tune of the final model), ``select`` (``accuracy``: the most accurate
    proposal; ``drop_per_cost``: the smallest accuracy drop per resource removed), ``round_to``
    (channels per step; default the task's). When a unit alone cannot reach an iteration's
    target the unit is skipped; when none can, the target is halved. With ``evaluations`` the
    search stops proposing when one evaluation is left (an iteration cut short keeps the best of
    the proposals it evaluated, in network order) and spends it on the current ratios projected
    onto the budget (plain evaluator, no fine-tune), so the result always meets the budget. The
    final model is :attr:`model` (None after such a projection); per-iteration summaries are
    ``result.info["iterations"]``. Channel granularity only.
    """

    name = "netadapt"
    channel_only = True
    options_type = NetAdaptOptions
    options: NetAdaptOptions
    model: nn.Module | None = None

    def check_task(self) -> None:
        if self.task.space.granularity != "channel":
            raise SearchError(
                "netadapt supports channel pruning only (it carries pruned, fine-tuned weights "
                f"between iterations); this task's granularity is {self.task.space.granularity!r}"
            )
        super().check_task()
        step = self.options.round_to
        self.round_to = int(self.task.config.round_to if step is None else step)

    # ------------------------------------------------------------ main loop
    def _search(self) -> None:
        state = _State(np.zeros(len(self.task.space)), copy.deepcopy(self.task.model).eval())
        if self.options.select == "drop_per_cost":  # the dense model's accuracy, on a copy
            state.accuracy = measure(self.task, copy.deepcopy(state.model), state.vec).accuracy
        self.result.info["iterations"] = []
        reduction = self.options.r0
        iteration = 0
        while not self._met(state.vec) and not self._exhausted():
            iteration += 1
            state = self._iterate(iteration, state, reduction)
            reduction *= self.options.decay
        if not self._met(state.vec):  # out of evaluations: the projection has no tuned weights
            self.evaluate(self.project(state.vec), note="final (evaluation budget exhausted)")
            return
        if iteration == 0:  # the dense model already meets the budget: it is the policy
            self.evaluate(state.vec, note="the dense model meets the budget")
        if self.options.long_finetune_batches > 0:
            self._long_finetune(state)
        self.model = state.model

    def _met(self, vec: np.ndarray) -> bool:
        return self.budget.met_by(self.cost_ratios(vec))

    def _exhausted(self) -> bool:
        """One evaluation is kept back for the final (projected or long fine-tuned) policy."""
        return self.remaining is not None and self.remaining <= 1

    # ------------------------------------------------------------ one iteration
    def _iterate(self, iteration: int, state: _State, reduction: float) -> _State:
        start = time.perf_counter()
        targets, proposals, used = self._plan(state.vec, reduction)
        if self.remaining is not None:
            proposals = proposals[: max(0, self.remaining - 1)]
        before = self.cost_ratios(state.vec)
        batches = self.options.finetune_batches
        model = self.backend.put(state.model)  # sent once per iteration to every worker
        key = uuid.uuid4().hex
        metrics = tuple(self.budget.metrics)
        jobs = [
            (
                key,
                model,
                state.vec,
                vec,
                batches,
                proposal_seed(self.seed, iteration, unit),
                metrics,
            )
            for unit, vec in proposals
        ]

        def describe(job: tuple[Any, ...]) -> str:
            return f"netadapt proposal {policy_text(self.task, job[3])} (iteration {iteration})"

        # The proposals of an iteration are independent: the backend may run them in parallel.
        outcomes: list[Proposal] = self.backend.run(iteration_proposal, jobs, describe)
        best: tuple[float, int, np.ndarray, Proposal] | None = None
        for (unit, vec), proposal in zip(proposals, outcomes, strict=True):
            name = self.task.space.units[unit].name
            self.record(proposal.evaluation, note=f"iteration {iteration} unit {name}")
            score = self._score(proposal.evaluation, vec, state, before, targets)
            if best is None or score > best[0]:  # ties: the first unit in network order
                best = (score, unit, vec, proposal)
        assert best is not None  # _plan raises when nothing can be proposed
        _, unit, vec, chosen = best
        new = _State(vec, chosen.model, chosen.evaluation.accuracy)
        self.result.info["iterations"].append(
            {
                "iteration": iteration,
                "reduction": used,
                "targets": targets,
                "proposals": len(proposals),
                "unit": self.task.space.units[unit].name,
                "accuracy": chosen.evaluation.accuracy,
                "costs": self.cost_ratios(new.vec),
                "seconds": time.perf_counter() - start,
            }
        )
        return new

    def _plan(
        self, vec: np.ndarray, reduction: float
    ) -> tuple[dict[str, float], list[tuple[int, np.ndarray]], float]:
        """This iteration's cost targets and one proposal per unit that can reach them alone;
        the reduction is halved until some unit can. Targets never go below the budget."""
        costs = self.cost_ratios(vec)
        unmet = {m: v for m, v in self.budget.limits.items() if costs[m] > v}
        step = self.round_to
        for _ in range(MAX_HALVINGS):
            targets = {m: max(costs[m] - reduction, limit) for m, limit in unmet.items()}

            def meets(trial: np.ndarray, targets: dict[str, float] = targets) -> bool:
                got = self.cost_ratios(trial)
                return all(got[m] <= t + _TOL for m, t in targets.items())

            proposals = []
            for unit in range(len(self.task.space)):
                cut = smallest_cut(self.task, vec, unit, step, meets)
                if cut is not None:
                    proposals.append((unit, cut))
            if proposals:
                return targets, proposals, reduction
            reduction /= 2
        raise SearchError(
            f"netadapt cannot remove anything more: no unit can be cut further towards the "
            f"budget {self.budget} (costs now {costs})"
        )

    def _score(
        self,
        e: Evaluation,
        vec: np.ndarray,
        state: _State,
        before: Mapping[str, float],
        targets: Mapping[str, float],
    ) -> float:
        """Higher is better: accuracy, or minus the accuracy drop per resource removed."""
        if self.options.select == "accuracy":
            return e.accuracy
        after = self.cost_ratios(vec)
        saved = sum(before[m] - after[m] for m in targets)
        base = state.accuracy if state.accuracy is not None else e.accuracy
        return -(base - e.accuracy) / max(saved, _TOL)

    # ------------------------------------------------------------ the end
    def _long_finetune(self, state: _State) -> None:
        """NetAdapt's long-term fine-tune of the final model, recorded as one more evaluation."""
        batches = self.options.long_finetune_batches
        per_epoch = math.ceil(len(self.task.data.train) / FINETUNE_BATCH_SIZE)
        t0 = time.perf_counter()
        fine_tune(
            state.model,
            self.task.data,
            epochs=math.ceil(batches / per_epoch),
            lr=FINETUNE_LR,
            batch_size=FINETUNE_BATCH_SIZE,
            device=self.task.config.device,
            max_batches=batches,
            seed=proposal_seed(self.seed, 0, 0),  # iterations count from 1: no clash
        )
        timing = {"finetune": time.perf_counter() - t0}
        evaluation = measure(self.task, state.model, state.vec, self.budget.metrics, timing)
        self.record(evaluation, note="long fine-tune")
