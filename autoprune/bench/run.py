"""Running the benchmark: each group of a plan as one experiment, recorded as it finishes.

A group (model x granularity x budget) is one :func:`autoprune.runner.experiment.run_experiment`
(searchers x seeds on Ray, one MLflow experiment for the whole plan); after its searches every
search's pruned model is timed against the dense one (:mod:`autoprune.bench.latency`), and the
group is appended to ``<out>/benchmark_runs.jsonl`` (:mod:`autoprune.bench.records`). With
``resume`` the groups recorded there are not run again; ``stop_after`` minutes starts no new
group once the run has lasted that long (the running one finishes). The report
(:mod:`autoprune.bench.report`) is rewritten from the records at the end, and
:func:`report_only` and :func:`retime_latency` work on the records alone.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.bench import records as rec
from autoprune.bench.data import ensure_data
from autoprune.bench.latency import (
    LATENCY_TIMING,
    retime_group,
    time_group,
    timed_now,
    timing_fields,
)
from autoprune.bench.plan import Group, Plan
from autoprune.bench.records import Record
from autoprune.bench.report import write_report
from autoprune.runner.experiment import Hooks, Outcome, run_experiment
from autoprune.task import Task
from autoprune.tracking.reader import TrackingStore
from autoprune.tracking.store import TrackingError


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (data missing, nothing recorded to report)."""


class CheckpointMismatch(BenchError):
    """A resumed benchmark whose model is not the one its recorded groups were measured on."""


@dataclass
class BenchResult:
    """What a run of the benchmark did: the groups recorded (plan order) and where."""

    out: Path
    done: list[Record]
    ran: int
    total: int
    minutes: float
    stopped: bool = False  # by stop_after, with groups left

    @property
    def report(self) -> Path:
        return self.out / "benchmark.md"


def recorded_models(done: list[Record]) -> dict[str, Record]:
    """The checkpoint (digest, or the dense test accuracy of records that predate it) each
    model's recorded groups were measured on: model -> the first recorded group."""
    out: dict[str, Record] = {}
    for g in done:
        out.setdefault(g["group"].split("/", 1)[0], g)
    return out


def _ratios(policy: Any) -> dict[str, float] | None:
    return None if policy is None else {str(k): float(v) for k, v in policy.ratios.items()}


@dataclass
class _Search:
    """Progress of the running search."""

    started: float = 0.0
    best: float = float("nan")
    count: int = 0


class BenchHooks(Hooks):
    """Progress lines, the dense model's test accuracy and checkpoint, each search's curve."""

    def __init__(
        self, group: Group, index: int, total: int, start: float, recorded: Record | None = None
    ) -> None:
        self.group, self.index, self.total, self.start = group, index, total, start
        self.recorded = recorded  # the model's earlier group, when resuming
        self.checkpoint: str | None = None
        self.task: Task | None = None
        self.dense_test_accuracy = float("nan")
        self.extra: dict[tuple[str, int], dict[str, Any]] = {}
        self._search = _Search()

    def task_ready(self, task: Task) -> None:
        self.task = task
        self.dense_test_accuracy = task.score(task.model, "test")[0]
        self.checkpoint = task.checkpoint_hash
        self._check_same_model()

    def _check_same_model(self) -> None:
        """Groups of one model are compared with each other: a resumed benchmark must measure
        the checkpoint its recorded groups used. A checkpoint retrained on another machine is
        another model (two trainings of ResNet-20 by the same recipe gave 92.68% and 92.60% test
        accuracy, and 42% and 69% search accuracy for the uniform policy at FLOPs 0.5)."""
        old = self.recorded
        if old is None:
            return
        digest = old.get("checkpoint")
        if digest is not None:
            same = digest == self.checkpoint
        else:
            same = abs(old.get("dense_test_accuracy", -1.0) - self.dense_test_accuracy) < 1e-9
        if same:
            return
        was = (
            f"checkpoint {digest}"
            if digest
            else f"a checkpoint with test accuracy {old.get('dense_test_accuracy')}"
        )
        raise CheckpointMismatch(
            f"{self.group.key}: the recorded group {old['group']} was measured on {was}; "
            f"this machine's {self.group.model} is checkpoint {self.checkpoint} (test "
            f"accuracy {self.dense_test_accuracy}), another model: rerun without --resume, "
            "or set the recorded checkpoint as model.checkpoint"
        )  # fmt: skip

    def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None:
        self._search = _Search(started=time.perf_counter())
        self.say(f"{searcher} seed {seed}: started ({total or 'own'} evaluations)")

    def evaluation(self, record: Any, result: Any) -> None:
        s = self._search
        s.count += 1
        if result.best is not None:
            s.best = result.best.accuracy
        if s.count % 25 == 0:
            best = "-" if np.isnan(s.best) else f"{100 * s.best:.1f}%"
            self.say(f"  {s.count} evaluations, best so far {best}")

    def search_finished(self, outcome: Outcome) -> None:
        extra: dict[str, Any] = {"curve": []}
        if outcome.result is not None:
            extra["curve"] = [None if np.isnan(v) else v for v in outcome.result.best_so_far()]
        extra["wall_seconds"] = time.perf_counter() - self._search.started
        self.extra[(outcome.searcher, outcome.seed)] = extra
        acc = outcome.metrics.get("test_accuracy")
        self.say(
            f"{outcome.searcher} seed {outcome.seed}: done in {extra['wall_seconds']:.0f} s, "
            f"test acc {'-' if acc is None else f'{100 * acc:.1f}%'}"
        )

    def say(self, text: str) -> None:
        elapsed = (time.perf_counter() - self.start) / 60
        print(
            f"[{elapsed:5.1f} min] group {self.index}/{self.total} {self.group.key}: {text}",
            flush=True,
        )


def run_group(
    plan: Plan,
    group: Group,
    hooks: BenchHooks,
    tracking_uri: str | None,
    command: str,
    revision: str | None = None,
) -> Record:
    """Run one group's experiment, time its pruned models and return its record."""
    cfg = plan.config(group, tracking_uri)
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    result = run_experiment(cfg, hooks=hooks)
    policies = [_ratios(o.policy) for o in result.outcomes]
    if hooks.task is None:  # run_experiment always announces its task; never here
        raise RuntimeError(f"{group.key}: the experiment ran without a task")
    hooks.say(f"timing the latency of {sum(p is not None for p in policies)} pruned models "
              "with the dense one")  # fmt: skip
    batch = hooks.task.config.eval.latency_batch_size
    dense_ms, timed = time_group(hooks.task, group.budget, batch, policies)
    rows = []
    for outcome, ratios, timing in zip(result.outcomes, policies, timed, strict=True):
        rows.append({
            "group": group.key,
            "model": group.model,
            "granularity": group.granularity,
            "budget": group.budget,
            **outcome.row(),
            **hooks.extra.get((outcome.searcher, outcome.seed), {}),
            "ratios": ratios,
            **timing,
            "deterministic": outcome.searcher in plan.deterministic,
        })  # fmt: skip
    return {
        "group": group.key,
        "parent_run": result.parent_id,
        "started": started,
        "command": command,
        "seconds": time.perf_counter() - t0,
        **timing_fields(dense_ms, batch),
        "dense_test_accuracy": hooks.dense_test_accuracy,
        "checkpoint": hooks.checkpoint,
        "revision": revision,
        "rows": rows,
    }


@dataclass
class _Run:
    """A benchmark run in progress: what is recorded, what ran, since when."""

    plan: Plan
    log: Path
    done: list[Record]
    t0: float = field(default_factory=time.perf_counter)
    ran: int = 0

    def left(self) -> int:
        recorded = {d["group"] for d in self.done}
        return sum(g.key not in recorded for g in self.plan.groups)

    def minutes(self) -> float:
        return (time.perf_counter() - self.t0) / 60


def run_benchmark(
    plan: Plan,
    out: Path,
    *,
    tracking_uri: str | None = None,
    resume: bool = False,
    stop_after: float | None = None,
    command: str = "autoprune bench",
) -> BenchResult:
    """Run the plan's groups not recorded in ``out`` (all of them without ``resume``), record
    each as it finishes and write the report. ``command`` is recorded as what made them."""
    if stop_after is not None and not stop_after >= 0:
        raise BenchError(f"stop_after must be >= 0 minutes, not {stop_after}")
    _check_data(plan)
    out.mkdir(parents=True, exist_ok=True)
    log = rec.records_path(out)
    if resume:
        done = rec.recorded_groups(log, plan)
    else:  # a new benchmark; the previous record is kept, not overwritten
        done = []
        rec.set_aside(log)
    run = _Run(plan, log, done)
    print(
        f"benchmark: {len(plan.groups)} groups, {len(done)} already done; "
        f"{plan.workers} Ray workers; MLflow experiment {plan.experiment!r}",
        flush=True,
    )
    stopped = _run_groups(run, tracking_uri, command, stop_after)
    return _finish(run, out, command, stopped)


def _check_data(plan: Plan) -> None:
    problem = ensure_data(plan)
    if problem is not None:
        raise BenchError(problem)


def _run_groups(
    run: _Run, tracking_uri: str | None, command: str, stop_after: float | None
) -> bool:
    """Run the groups not recorded yet; True when ``stop_after`` stopped it with groups left."""
    finished = {g["group"] for g in run.done}
    folder = run.plan.source.parent if run.plan.source is not None else None
    revision = rec.code_revision(folder)  # the code this process imported, not a later commit
    groups = run.plan.groups
    try:
        for i, group in enumerate(groups, 1):
            if group.key in finished:
                continue
            if run.ran and stop_after is not None and run.minutes() >= stop_after:
                print(f"stopped after {run.minutes():.1f} min (--stop-after {stop_after:g}): "
                      f"{run.left()} groups left; go on with --resume", flush=True)  # fmt: skip
                return True
            run.ran += 1
            model = recorded_models(run.done).get(group.model)
            hooks = BenchHooks(group, i, len(groups), run.t0, model)
            result = run_group(run.plan, group, hooks, tracking_uri, command, revision)
            run.done.append(result)
            rec.append_record(run.log, result)
    except KeyboardInterrupt:
        print(f"interrupted: {len(run.done)} groups recorded in {run.log}; rerun with --resume",
              flush=True)  # fmt: skip
        raise
    return False


def _finish(run: _Run, out: Path, command: str, stopped: bool) -> BenchResult:
    done = rec.in_plan_order(run.done, run.plan)
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    # The command and start of the groups' own runs (a resume only rewrites the report).
    commands, started, minutes = rec.provenance(done, command, now)
    write_report(out, run.plan, done, commands, started, minutes)
    return BenchResult(out, done, run.ran, len(run.plan.groups), minutes, stopped)


def report_only(plan: Plan, out: Path) -> BenchResult:
    """Rewrite the report from what ``out`` records, running nothing (a partial plan too)."""
    log = rec.records_path(out)
    done = rec.in_plan_order(rec.recorded_groups(log, plan), plan)
    if not done:
        raise BenchError(f"no group of this plan is recorded in {log}")
    commands, started, minutes = rec.provenance(done, rec.OLD_COMMAND, "?")
    write_report(out, plan, done, commands, started, minutes)
    return BenchResult(out, done, 0, len(plan.groups), minutes)


def retime_latency(plan: Plan, out: Path, tracking_uri: str | None = None) -> list[str]:
    """Time again the latency of the recorded groups that were timed an older way (beside
    running searches, or cold: see :mod:`autoprune.bench.latency`): each group's pruned models
    with the dense one, interleaved and warm, with nothing else running. Every group is written
    back as soon as it is timed; the report is rewritten. Returns the groups left as recorded
    (their policies or checkpoint are not to be had), each with the reason."""
    log = rec.records_path(out)
    done = rec.recorded_groups(log, plan)
    if not done:
        raise BenchError(f"no group of this plan is recorded in {log}")
    _check_data(plan)
    opened: list[TrackingStore] = []

    def store() -> TrackingStore:
        if not opened:
            opened.append(TrackingStore(tracking_uri))
        return opened[0]

    groups = {g.key: g for g in plan.groups}
    left = []
    for record in done:
        key = record["group"]
        if timed_now(record):
            print(f"{key}: already timed {LATENCY_TIMING}")
            continue
        try:
            retime_group(record, groups[key], plan, tracking_uri, store)
        except (TrackingError, ValueError, OSError) as err:  # config, model, data, policy
            print(f"{key}: left as recorded: {err}")
            left.append(f"{key}: {err}")
            continue
        rec.replace_records(log, {key: record})
    report_only(plan, out)
    return left
