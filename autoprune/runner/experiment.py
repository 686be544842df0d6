"""Experiments: a task, a budget and searchers x seeds, run and recorded in MLflow; resumable.

An experiment config is a task config (model, data, granularity, criterion, evaluation) plus a
``search`` section (searchers, budget, evaluations, seeds, workers, per-searcher options) and a
``tracking`` section (MLflow URI and experiment name). :func:`run_experiment` makes one MLflow
parent run per launch and a child run per searcher and seed, streams every evaluation to it and
ends each child with its best policy, history, plots and test accuracy; the parent gets the
comparison table and plot.

Nothing finished is lost: every evaluation is appended to a local journal
(``.autoprune/journal/<run id>.jsonl``) the moment it is recorded and streamed to MLflow in
batches; Ctrl-C flushes and marks the runs KILLED; after a SIGKILL the journal still has what
MLflow had not yet received. :func:`run_experiment` with ``resume=PARENT_RUN_ID`` uploads the
journal's missing evaluations, then re-runs every unfinished search with the same seed while
answering its recorded policies from memory (replay): the searcher's state (agent weights,
replay buffer, noise, history) is rebuilt exactly as it was, without evaluating anything twice,
and the search goes on to the requested number of evaluations. NetAdapt's proposals carry
fine-tuned weights, so a resumed NetAdapt recomputes its finished iterations (nothing is logged
twice).

The config is :mod:`autoprune.runner.config`, the journal :mod:`autoprune.runner.journal`, the
check of a latency search on the clock :mod:`autoprune.runner.latency_check`, the comparison
plot :func:`autoprune.plots.plot_curves`. This module is the top layer (like the CLI and the
service): it imports the searchers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from autoprune.agents import get_searcher
from autoprune.agents.base import Record, SearchError, SearchResult
from autoprune.apply import apply_policy
from autoprune.budget import Budget
from autoprune.evaluate import Evaluation
from autoprune.interrupts import held
from autoprune.parallel import Backend, make_backend
from autoprune.plots import plot_curves
from autoprune.policy import Policy
from autoprune.runner.config import (
    ExperimentConfig,
    SearchConfig,
    evaluation_notices,
    evaluations_for,
    experiment_config,
    searcher_options,
    seeds_for,
)
from autoprune.runner.journal import Journal
from autoprune.runner.latency_check import check_latency_on_clock
from autoprune.task import Task, build_task
from autoprune.tracking.store import TrackingError
from autoprune.tracking.writer import Tracker

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One searcher x seed of an experiment."""

    searcher: str
    seed: int
    run_id: str
    result: SearchResult | None
    policy: Policy | None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "FINISHED"

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "searcher": self.searcher,
            "seed": self.seed,
            "best_search_accuracy": m.get("best_search_accuracy"),
            "policy_accuracy": m.get("policy_accuracy"),
            "test_accuracy": m.get("test_accuracy"),
            "test_accuracy_finetuned": m.get("test_accuracy_finetuned"),
            "flops_ratio": m.get("best_flops_ratio"),
            "params_ratio": m.get("best_params_ratio"),
            "latency_ratio_measured": m.get("best_latency_measured"),
            "latency_ratio_table": m.get("best_latency_table"),
            "evaluations": m.get("evaluations"),
            "seconds": m.get("search_seconds"),
            "run_id": self.run_id,
        }


@dataclass
class ExperimentResult:
    """An experiment's searches (one outcome per searcher x seed), where they are recorded, and
    the task searched."""

    parent_id: str
    experiment: str
    tracking_uri: str
    outcomes: list[Outcome]
    task: Task | None = field(default=None, repr=False, compare=False)  # what was searched

    @property
    def best(self) -> Outcome:
        """The search whose policy is best by ``policy_accuracy``: the policy judged like every
        policy (search split, adaptive BN, no fine-tune), the number that ranks searchers fairly,
        as ``autoprune best`` does. (A :class:`SearchResult`'s ``best`` is its own best record by
        search accuracy, within one search.)"""
        done = [o for o in self.outcomes if o.policy is not None]
        if not done:
            raise SearchError("no search of this experiment found a policy within the budget")
        return max(done, key=lambda o: o.metrics.get("policy_accuracy", -1.0))

    def rows(self) -> list[dict[str, Any]]:
        return [o.row() for o in self.outcomes]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an experiment: everything finished is recorded; resume with the parent id."""

    def __init__(self, parent_id: str) -> None:
        super().__init__(parent_id)
        self.parent_id = parent_id


class Hooks:
    """Progress reporting (the CLI draws a progress bar; the default does nothing)."""

    def task_ready(self, task: Task) -> None: ...

    def notice(self, text: str) -> None:
        """Something the user asked for that does not apply (e.g. evaluations for uniform)."""
        log.warning(text)

    def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None: ...

    def evaluation(self, record: Record, result: SearchResult) -> None: ...

    def search_finished(self, outcome: Outcome) -> None: ...


def _tags(cfg: ExperimentConfig, budget: str) -> dict[str, str]:
    return {
        "autoprune.model": cfg.model.name,
        "autoprune.data": cfg.data.name,
        "autoprune.granularity": cfg.granularity,
        "autoprune.criterion": cfg.criterion,
        "autoprune.budget": budget,
    }


def _evaluation(task: Task, row: dict[str, Any]) -> Evaluation:
    """A recorded history row as the evaluator's result (costs recomputed, exactly analytic)."""
    vec = task.ratio_vector(row["ratios"])
    e = Evaluation.of(
        task, vec, float(row["accuracy"]), float(row["loss"]),
        {"total": float(row.get("eval_seconds") or 0.0)},
        row.get("latency_ratio_table", row.get("latency_ratio")),  # the name before 2026-12-08
    )  # fmt: skip
    e.cached = bool(row.get("cached", False))
    e.partial = bool(row.get("partial", False))
    return e


def test_metrics(
    task: Task,
    ratios: dict[str, float],
    finetune_epochs: int,
    finetune_batches: int | None = None,
) -> dict[str, float]:
    """Test accuracy of a policy after adaptive BN, and after fine-tuning when asked."""
    applied = apply_policy(
        task, ratios, finetune_epochs=finetune_epochs, latency=False,
        finetune_batches=finetune_batches,
    )  # fmt: skip
    out = {"test_accuracy": applied.pruned_no_finetune["test_accuracy"]}
    if finetune_epochs > 0:
        out["test_accuracy_finetuned"] = applied.after["test_accuracy"]
    return out


def run_experiment(
    config: ExperimentConfig | None = None,
    resume: str | None = None,
    hooks: Hooks | None = None,
    evaluations: int | None = None,
    task: Task | None = None,
) -> ExperimentResult:
    """Run (or, with ``resume``, continue) an experiment; see the module docstring.

    With ``resume`` the config comes from the parent run (``config`` only supplies the tracking
    URI); ``evaluations`` changes the requested total of the episodic searchers. ``task``: a task
    already built (e.g. :func:`autoprune.task.task_from_module` on your own model and data); the
    config then supplies only the search and tracking sections (resume: pass the same task).
    """
    hooks = hooks or Hooks()
    cfg = config or ExperimentConfig()
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # unreachable: fails in seconds
    if resume is not None:
        cfg, tracker = _resumed_config(tracker, cfg, resume)
    if evaluations is not None:
        cfg = cfg.model_copy(
            update={"search": cfg.search.model_copy(update={"evaluations": evaluations})}
        )
    task = task if task is not None else build_task(cfg.task(), progress=True)
    # the task's config as built: a given task's, or with ``ignore_unsupported`` the units it
    # kept out added to ``ignore`` (recorded so that a resume rebuilds the same space)
    cfg = cfg.model_copy(update=dict(task.config))
    search = cfg.search
    budget = task.check_budget(search.budget)
    for name in search.searchers:  # options and evaluation budgets, before anything runs
        seeds_for(search, name)
        get_searcher(name)(
            task, budget, seed=0, evaluations=evaluations_for(search, name),
            **searcher_options(search, name),
        )  # fmt: skip
    for text in evaluation_notices(search):
        hooks.notice(text)
    if getattr(task, "skipped", None):
        hooks.notice(
            f"ignore_unsupported: units {task.skipped} are kept out of the search (channel "
            "pruning cannot cut them correctly); the run's config lists them under ignore"
        )
    hooks.task_ready(task)
    config_dict = cfg.model_dump(mode="json")
    tags = _tags(cfg, str(budget))
    if resume is None:
        name = f"{'+'.join(search.searchers)} {budget}"
        parent = tracker.start_parent(name, config_dict, tags)
        existing: dict[tuple[str, int], dict[str, Any]] = {}
    else:
        parent = resume
        tracker.reopen(parent)
        existing = {(c["searcher"], int(c["seed"])): c for c in tracker.child_runs(parent)}
    outcomes: list[Outcome] = []
    needs_latency = "latency" in budget.metrics
    backend = make_backend(
        task, search.workers, search.ray_address, predict_latency=needs_latency,
        threads=search.worker_threads,
    )  # fmt: skip
    try:
        for name in search.searchers:
            for seed in seeds_for(search, name):
                child = existing.get((name, seed))
                if child is not None and child["status"] == "FINISHED":
                    outcomes.append(_finished(tracker, child))
                    continue
                outcome = _run_one(
                    tracker, task, cfg, budget, backend, parent, name, seed, tags, config_dict,
                    child["run_id"] if child else None, hooks,
                )  # fmt: skip
                outcomes.append(outcome)
    except KeyboardInterrupt:
        tracker.mark(parent, "KILLED")
        raise Interrupted(parent) from None
    except SystemExit:  # asked to exit (e.g. SIGTERM through Ray's handler): resumable
        tracker.mark(parent, "KILLED")
        raise
    except BaseException:
        tracker.mark(parent, "FAILED")
        raise
    finally:
        backend.close()
    result = ExperimentResult(parent, cfg.tracking.experiment, tracker.uri, outcomes, task)
    _log_comparison(tracker, result)
    tracker.mark(parent, "FINISHED")
    return result


def _resumed_config(
    tracker: Tracker, given: ExperimentConfig, parent: str
) -> tuple[ExperimentConfig, Tracker]:
    """The config recorded with a parent run (its experiment, the given tracking URI)."""
    run = tracker.get_run(parent)
    if run.data.tags.get("autoprune.kind") != "parent":
        raise TrackingError(f"run {parent} is not an autoprune search launch (a parent run)")
    data = tracker.config_of(parent)
    data.setdefault("tracking", {})["uri"] = given.tracking.uri
    # Where it runs is the caller's, not the record's: a service resumes its launches on its
    # own Ray (the recorded config may name none, and a local Ray per launch would start).
    search = data.setdefault("search", {})
    if given.search.ray_address is not None:
        search["ray_address"] = given.search.ray_address
    if given.search.worker_threads is not None:
        search["worker_threads"] = given.search.worker_threads
    cfg = experiment_config(data)
    if cfg.tracking.experiment != tracker.experiment:
        tracker = Tracker(given.tracking.uri, cfg.tracking.experiment)
    return cfg, tracker


def _finished(tracker: Tracker, child: dict[str, Any]) -> Outcome:
    """A search finished before a resume: its recorded policy and metrics."""
    policy_dict, _ = tracker.best_policy(run_id=child["run_id"])
    return Outcome(
        child["searcher"], int(child["seed"]), child["run_id"], None,
        Policy.from_dict(policy_dict), dict(child.get("metrics") or {}),
    )  # fmt: skip


def _run_one(
    tracker: Tracker,
    task: Task,
    cfg: ExperimentConfig,
    budget: Budget,
    backend: Backend,
    parent: str,
    name: str,
    seed: int,
    tags: dict[str, str],
    config_dict: dict[str, Any],
    run_id: str | None,
    hooks: Hooks,
) -> Outcome:
    search = cfg.search
    evaluations = evaluations_for(search, name)
    if run_id is None:
        run_id = tracker.start_child(parent, name, seed, config_dict, tags)
    else:
        tracker.reopen(run_id)
    journal = Journal(run_id)
    recorded = _recover(tracker, journal, run_id)
    done = len(recorded)
    logger = tracker.logger(run_id, cfg.tracking.flush_every, cfg.tracking.flush_seconds)

    def callback(record: Record, result: SearchResult) -> None:
        if record.index > done:  # replayed evaluations are already recorded
            with held():  # journal line and MLflow buffer together, never one without the other
                journal.append(record)
                logger(record, result)
        hooks.evaluation(record, result)

    options = searcher_options(search, name)
    searcher = get_searcher(name)(
        task, budget, seed=seed, evaluations=evaluations, callback=callback, backend=backend,
        **options,
    )  # fmt: skip
    if recorded:
        replay = [_evaluation(task, row) for row in recorded]
        backend.preload(replay)
        if searcher.evaluator is not getattr(backend, "evaluator", None):
            searcher.evaluator.preload(replay)
    hooks.search_started(name, seed, evaluations, done)
    try:  # the search, then its result checked, judged and recorded: stopped anywhere, resumable
        result = searcher.run()
        result.info["resumed_from"] = done
        policy, metrics = _conclude(task, result, budget, search, backend, hooks)
        tracker.finish(run_id, result, policy, extra_metrics=metrics)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or asked to exit: resumable
        tracker.mark(run_id, "KILLED")
        raise
    except BaseException:
        tracker.mark(run_id, "FAILED")
        raise
    summary = {
        **metrics,
        "evaluations": float(result.evaluations),
        "search_seconds": result.seconds,
    }
    if result.best is not None:
        summary["best_search_accuracy"] = result.best.accuracy
    outcome = Outcome(name, seed, run_id, result, policy, summary)
    hooks.search_finished(outcome)
    return outcome


def _conclude(
    task: Task,
    result: SearchResult,
    budget: Budget,
    search: SearchConfig,
    backend: Backend,
    hooks: Hooks,
) -> tuple[Policy | None, dict[str, float]]:
    """A finished search's policy (checked on the clock for a latency budget) and the summary
    metrics of its run: achieved costs, the policy's accuracy judged like any policy, and its
    test accuracy (after the fine-tune the config asks for)."""
    clock = check_latency_on_clock(
        task, result, budget, search.latency_check,
        evaluate=lambda vec: backend.map([vec])[0],
    )  # fmt: skip
    if clock is not None and not clock["met"]:
        hooks.notice(
            f"{result.searcher} seed {result.seed}: its policy measures {clock['measured']:.3f} "
            f"of the dense latency on this machine against the budget's {clock['limit']:g} "
            f"(the lookup table says {clock['table']:.3f}), and none of the {clock['timed']} "
            "policies timed meets it; search again with a lower latency limit to leave a margin"
        )
    best = result.best
    if best is None:
        return None, {}
    policy = result.policy()
    metrics = {"best_flops_ratio": best.flops_ratio, "best_params_ratio": best.params_ratio}
    if clock is not None:
        metrics.update(
            best_latency_measured=clock["measured"], best_latency_table=clock["table"],
            latency_check_met=float(clock["met"]), latency_check_timed=clock["timed"],
            latency_check_timings=clock["timings"],
        )  # fmt: skip
        policy.metrics["latency_measured"] = clock["measured"]
    # The policy judged like every policy (search split, adaptive BN, dense weights): the one
    # number that ranks searchers fairly (NetAdapt's search accuracy includes fine-tunes).
    metrics["policy_accuracy"] = backend.map([task.ratio_vector(best.ratios)])[0].accuracy
    metrics.update(test_metrics(task, best.ratios, search.finetune_epochs, search.finetune_batches))
    return policy, metrics


def _recover(tracker: Tracker, journal: Journal, run_id: str) -> list[dict[str, Any]]:
    """Evaluations a run recorded before (MLflow, plus what only the local journal has, which is
    uploaded now), in order. Empty for a new run."""
    logged = tracker.history(run_id)
    have = {int(r["index"]) for r in logged}
    # Killed between a flush's history chunk and its metrics: those steps have no metrics yet.
    stepped = tracker.logged_steps(run_id)
    unstepped = [r for r in logged if int(r["index"]) not in stepped]
    if unstepped:
        tracker.log_rows(run_id, unstepped, chunk=False)
    missing = [r for r in journal.rows() if int(r["index"]) not in have]
    if missing:
        tracker.log_rows(run_id, missing)
    rows = {int(r["index"]): r for r in [*logged, *missing]}
    indices = sorted(rows)
    if indices != list(range(1, len(indices) + 1)):
        gap = next(i for i, k in enumerate(indices, 1) if i != k)
        indices = indices[: gap - 1]  # replay stops at the first gap; the rest is re-run
    return [rows[i] for i in indices]


def _log_comparison(tracker: Tracker, result: ExperimentResult) -> None:
    rows = [{k: v for k, v in r.items()} for r in result.rows()]
    tracker.log_table(result.parent_id, rows, "comparison")
    curves = {
        f"{o.searcher} seed {o.seed}": o.result.best_so_far()
        for o in result.outcomes
        if o.result is not None
    }
    if curves:
        tracker.log_figure(result.parent_id, plot_curves(curves), "comparison.png")
