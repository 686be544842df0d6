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

This module is the top layer (like the CLI and the service): it imports the searchers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError, field_validator

from autoprune.agents import SEARCHERS, get_searcher
from autoprune.agents.base import Preflight, Record, SearchError, SearchResult
from autoprune.agents.registry import options_model
from autoprune.apply import apply_policy, latency_ratios
from autoprune.budget import Budget
from autoprune.config import ConfigError, TaskConfig, _Strict, validated
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.interrupts import held
from autoprune.parallel import Backend, make_backend
from autoprune.policy import Policy
from autoprune.task import Task, build_task
from autoprune.tracking.tracker import Tracker, TrackingError

JOURNAL_DIR = Path(".autoprune") / "journal"


# ------------------------------------------------------------------ config


log = logging.getLogger(__name__)

DEFAULT_EVALUATIONS = 300  # ddpg / random when search.evaluations is not given
LATENCY_CHECK = 4  # policies timed on the clock after a latency search (search.latency_check)


class SearchConfig(_Strict):
    """What to search: searchers x seeds under one budget."""

    searchers: list[str] = Field(default_factory=lambda: ["ddpg"], min_length=1)
    budget: str = "flops=0.25"
    evaluations: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Evaluations per search: the budget of ddpg / random (default "
            f"{DEFAULT_EVALUATIONS}), a limit for netadapt / sensitivity (default: none); "
            "uniform and global evaluate one policy."
        ),
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    workers: int = Field(default=0, ge=0, description="Ray workers (0: in this process).")
    ray_address: str | None = None
    worker_threads: int | None = Field(
        default=None, ge=1, description="torch threads per Ray worker (None: cores // workers)."
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-searcher options, e.g. {ddpg: {sigma: 0.3}}.",
        json_schema_extra=lambda schema: _options_schema(schema),
    )
    finetune_epochs: int = Field(
        default=0, ge=0, description="Fine-tune each best policy this long for its test accuracy."
    )
    finetune_batches: int | None = Field(
        default=None,
        ge=1,
        description="Cap on that fine-tune's batches (None: the whole finetune_epochs).",
    )
    latency_check: int = Field(
        default=LATENCY_CHECK,
        ge=0,
        description=(
            "Latency budgets are searched against a lookup table: after each search, time its "
            "policy on this machine and, when it misses the limit, prune it further to the "
            "table limit the timing says meets it; at most this many policies timed (0: trust the "
            "table)."
        ),
    )

    @field_validator("searchers")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        out = [n.strip().lower() for n in names]
        for n in out:
            get_searcher(n)  # SearchError (a ValueError) names the known ones
        return out

    @field_validator("budget")
    @classmethod
    def _budget(cls, text: str) -> str:
        return str(Budget.parse(text))


class TrackingConfig(_Strict):
    """Where runs are recorded."""

    uri: str | None = Field(default=None, description="MLflow URI (default ./mlflow.db).")
    experiment: str = "autoprune"
    flush_every: int = Field(default=50, ge=1)
    flush_seconds: float = Field(default=5.0, gt=0)


class ExperimentConfig(TaskConfig):
    """A task config plus ``search`` and ``tracking``."""

    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def task(self) -> TaskConfig:
        return TaskConfig.model_validate(self.model_dump(exclude={"search", "tracking"}))


def _options_schema(schema: dict[str, Any]) -> None:
    """The JSON schema of ``search.options``: one typed object per searcher (its options with
    their bounds, ``options_model``), no other keys."""
    schema.pop("additionalProperties", None)
    schema["properties"] = {
        name: {k: v for k, v in options_model(name).model_json_schema().items() if k != "title"}
        for name in sorted(SEARCHERS)
    }
    schema["additionalProperties"] = False


def check_options(name: str, options: Any) -> dict[str, Any]:
    """``search.options.<name>`` checked against the searcher's schema (types and bounds):
    the validated options, or a :class:`ConfigError` naming the field."""
    if name not in SEARCHERS:
        raise ConfigError(
            f"search.options: unknown searcher {name!r}; choose from {sorted(SEARCHERS)}"
        )
    if not isinstance(options, dict):
        raise ConfigError(f"search.options.{name} must be a mapping of option names to values")
    try:
        checked = options_model(name).model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        known = sorted(get_searcher(name).defaults)
        hint = f"; known: {known}" if first["type"] == "extra_forbidden" else ""
        raise ConfigError(f"search.options.{name}.{where}: {first['msg']}{hint}") from None
    return checked.model_dump(exclude_unset=True)


def experiment_config(
    source: ExperimentConfig | dict[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """Validated experiment config from a YAML path, a dict, a config or nothing (defaults)."""
    cfg = validated(ExperimentConfig, source, overrides)
    options = {name: check_options(name, o) for name, o in cfg.search.options.items()}
    cfg.search.options = options
    for name in options:
        seeds_for(cfg.search, name)
    for name in cfg.search.searchers:  # what would fail once running, found from the options
        ctx = Preflight(cfg.granularity, _evaluations_for(cfg.search, name))
        for where, message in get_searcher(name).preflight(options.get(name, {}), ctx)[:1]:
            raise ConfigError(f"search.{'.'.join(where)}: {message}")
    return cfg


# ------------------------------------------------------------------ journal


class Journal:
    """Append-only local copy of a run's evaluations, written as each one is recorded."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        self.path = (root or Path.cwd()) / JOURNAL_DIR / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @held()
    def append(self, record: Record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record.to_dict()) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out: dict[int, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            out[int(row["index"])] = row
        return [out[i] for i in sorted(out)]


# ------------------------------------------------------------------ running


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
            "latency_ratio": m.get("best_latency_measured"),
            "evaluations": m.get("evaluations"),
            "seconds": m.get("search_seconds"),
            "run_id": self.run_id,
        }


@dataclass
class ExperimentResult:
    parent_id: str
    experiment: str
    tracking_uri: str
    outcomes: list[Outcome]
    task: Task | None = field(default=None, repr=False, compare=False)  # what was searched

    def best(self) -> Outcome:
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
        {"total": float(row.get("eval_seconds") or 0.0)}, row.get("latency_ratio"),
    )  # fmt: skip
    e.cached = bool(row.get("cached", False))
    e.partial = bool(row.get("partial", False))
    return e


PER_SEARCHER = ("evaluations", "seeds")
"""Keys of ``search.options.<searcher>`` that override the search section for that searcher only
(e.g. ``uniform: {seeds: [0]}``: a deterministic searcher gives the same result for every seed)."""


def seeds_for(cfg: SearchConfig, name: str) -> list[int]:
    seeds = cfg.options.get(name, {}).get("seeds")
    if seeds is None:
        return list(cfg.seeds)
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"search.options.{name}.seeds must be a non-empty list of integers")
    return [int(s) for s in seeds]


def _searcher_options(cfg: SearchConfig, name: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.options.get(name, {}).items() if k not in PER_SEARCHER}


def _evaluations_for(cfg: SearchConfig, name: str) -> int | None:
    """The evaluation budget a searcher gets: its own option, else ``search.evaluations`` for
    every searcher that can use one (a budget for ddpg / random, a limit for netadapt /
    sensitivity), else the default budget of the searchers that need one."""
    options = cfg.options.get(name, {})
    if "evaluations" in options:
        return int(options["evaluations"])
    searcher = get_searcher(name)
    if searcher.fixed_evaluations is not None:
        return None
    if cfg.evaluations is not None:
        return cfg.evaluations
    return DEFAULT_EVALUATIONS if searcher.needs_evaluations else None


def evaluation_notices(cfg: SearchConfig) -> list[str]:
    """What ``search.evaluations`` does not change, said rather than silently ignored."""
    if cfg.evaluations is None:
        return []
    out = []
    for name in cfg.searchers:
        fixed = get_searcher(name).fixed_evaluations
        if fixed is not None and "evaluations" not in cfg.options.get(name, {}):
            out.append(
                f"{name} evaluates {fixed} polic{'y' if fixed == 1 else 'ies'}: "
                f"evaluations={cfg.evaluations} does not apply to it"
            )
    return out


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


LATENCY_CHECK_MARGIN = 0.02
"""How far under the limit a repaired policy aims on the clock (timings vary by about 1%)."""


def _table_target(points: list[tuple[float, float]], aim: float) -> float:
    """The table ratio expected to measure ``aim``, from the (table, measured) pairs timed so
    far: proportional to the last one at first, then along the line through the last two
    (the table's error grows as a model is pruned further, so a proportional step falls short);
    always below the last table ratio."""
    t1, m1 = points[-1]
    target = t1 * aim / m1
    if len(points) > 1:
        t0, m0 = points[-2]
        slope = (m1 - m0) / (t1 - t0) if t1 != t0 else 0.0
        if slope > 0:
            target = t1 + (aim - m1) / slope
    return min(target, t1 * (1 - 1e-3))


def _bracket_target(
    points: list[tuple[float, float]], hit: float, aim: float, meets: Callable[[float], bool]
) -> float | None:
    """After a repair that meets the limit with room to spare: the table ratio between the
    least pruned policy that meets (table ratio ``hit``) and the most pruned one that misses,
    on the line through their timings, kept off both ends (a tenth of the gap); None once the
    gap is under 0.5% of the table ratio (nothing left to gain)."""
    met = {t: m for t, m in points if meets(m)}
    missed = [(t, m) for t, m in points if not meets(m) and t > hit]
    if not missed:
        return None
    t1, m1 = min(missed)
    t0, m0 = hit, met[hit]
    gap = t1 - t0
    if gap < 0.005 * t1:
        return None
    target = t0 + (aim - m0) * gap / (m1 - m0) if m1 > m0 else t0 + gap / 2
    return min(max(target, t0 + 0.1 * gap), t1 - 0.1 * gap)


LatencyTimer = Callable[[Task, list[np.ndarray]], list[float]]
"""Measured latency ratios (pruned / dense) of ratio vectors, as :func:`latency_ratios`."""


def check_latency_on_clock(
    task: Task,
    result: SearchResult,
    budget: Budget,
    count: int,
    timer: LatencyTimer | None = None,
    evaluate: Callable[[np.ndarray], Evaluation] | None = None,
) -> dict[str, Any] | None:
    """Check a latency search's result on this machine's clock, and repair it when it misses.

    Searches meet a latency budget by a lookup table of per-layer latencies, whose prediction
    for a whole pruned model can be off either way (``experiments/results/latency_check.md``).
    The search's best policy is timed first (``timer``: against the dense model, interleaved);
    if it meets the limit it stays. Otherwise the best policy is projected again (more pruning,
    every unit the same fraction of the way to its maximum, as searches project) onto a tighter
    table limit, the one the timings so far say measures 2% under the limit
    (:func:`_table_target`), and timed; up to ``count`` policies in all. A policy that meets
    the limit by less than the margin is timed twice and judged by the slower timing. A
    projection that meets the limit with more than twice the margin to spare pruned too much:
    the remaining timings step back up between it and the closest miss
    (:func:`_bracket_target`). The least pruned
    projection that met the limit on the clock is evaluated like any policy (``evaluate``,
    default a fresh :class:`~autoprune.evaluate.Evaluator`) and becomes ``result.best``. When
    none does, or the tighter limit is out of reach, the best stays and the summary says it
    misses.

    Returns None where there is nothing to check (no latency limit, ``count`` 0, no policy);
    else ``limit``, ``measured`` and ``table`` (latency ratios of the returned policy), ``met``,
    ``replaced``, ``timed`` (policies timed), ``timings`` (timings taken), ``searched_measured``
    and ``searched_table`` (the search's own best).
    """
    limit = budget.limits.get("latency")
    best = result.best
    if limit is None or count < 1 or best is None:
        return None
    timer = timer or latency_ratios

    def table(vec: np.ndarray) -> float:
        return float(task.cost_ratios(vec, ("latency",))["latency"])

    def meets(ratio: float) -> bool:  # the tolerance of ApplyResult.budget_check
        return ratio <= limit * (1 + 1e-6) + 1e-9

    vec = task.ratio_vector(best.ratios)
    searched_table = float(best.latency_ratio) if best.latency_ratio is not None else table(vec)
    aim = limit * (1 - LATENCY_CHECK_MARGIN)
    timings = 0

    def clock(policy: np.ndarray) -> float:
        """The policy's measured ratio; one that meets the limit by less than the margin is
        timed again and judged by the slower timing (timings vary by 1-2%)."""
        nonlocal timings
        measured = timer(task, [policy])[0]
        timings += 1
        if measured > aim * (1 + 1e-6) and meets(measured):
            measured = max(measured, timer(task, [policy])[0])
            timings += 1
        return float(measured)

    first = clock(vec)
    points = [(searched_table, first)]  # (table ratio, measured ratio) of each policy timed
    close = limit * (1 - 2 * LATENCY_CHECK_MARGIN)  # a repair measuring this much or more is kept
    hit: tuple[float, float, np.ndarray, float] | None = None  # target, table, policy, measured
    while not meets(first) and len(points) < count:
        if hit is None:
            target = _table_target(points, aim)
        else:
            if hit[3] >= close:
                break
            between = _bracket_target(points, hit[1], aim, meets)
            if between is None:
                break
            target = between
        try:
            tighter = Budget({**budget.limits, "latency": target})
        except ValueError:
            break
        candidate = task.project(vec, tighter)
        predicted = table(candidate)
        if not tighter.met_by(task.cost_ratios(candidate, tighter.metrics)):
            break  # the tighter limit is out of this model's reach
        points.append((predicted, clock(candidate)))
        if meets(points[-1][1]) and (hit is None or predicted > hit[1]):
            hit = (target, predicted, candidate, points[-1][1])  # the least pruning that meets
    chosen, measured, chosen_table = best, first, searched_table
    if hit is not None:
        target, chosen_table, candidate, measured = hit
        e = (evaluate or Evaluator(task).evaluate)(candidate)
        chosen = Record(
            index=0, ratios=task.ratios_dict(candidate), accuracy=e.accuracy, loss=e.loss,
            flops_ratio=e.flops_ratio, params_ratio=e.params_ratio, latency_ratio=chosen_table,
            meets_budget=True, eval_seconds=float(sum(e.seconds.values())),
            elapsed=result.seconds, note=f"clock check: projected to latency {target:.4f}",
        )  # fmt: skip
    result.best = chosen
    timed = len(points)
    summary = {
        "limit": float(limit), "measured": float(measured), "table": chosen_table,
        "met": meets(measured), "replaced": chosen is not best, "timed": timed,
        "timings": timings, "searched_measured": float(first), "searched_table": searched_table,
    }  # fmt: skip
    result.info["latency_check"] = summary
    return summary


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
            task, budget, 0, _evaluations_for(search, name), None, None, None,
            **_searcher_options(search, name),
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
    evaluations = _evaluations_for(search, name)
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

    options = _searcher_options(search, name)
    searcher = get_searcher(name)(
        task, budget, seed, evaluations, callback, None, backend, **options
    )
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
    policy = result.policy(task)
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


def plot_curves(curves: dict[str, list[float]]) -> Any:
    """Best search accuracy so far vs evaluations, one line per search."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best search accuracy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
