"""The published benchmark: every searcher across models, budgets and granularities (make bench).

For each group (model x granularity x budget) of ``experiments/benchmark.yaml`` it runs one
experiment (:func:`autoprune.runner.experiment.run_experiment`: searchers x seeds on Ray with all cores,
recorded in one MLflow experiment) and, for every search, measures the latency of the pruned
model. Each cell (group x searcher) reports mean and spread (std over seeds) of the best search
accuracy, the test accuracy of the best policy before and after the same fine-tune, the achieved
cost ratios, the measured latency, evaluations and wall time. A verdict per group, computed from
the rows, names the best searcher and says whether the agent leads by more than the seeds'
spread (a lead inside the spread is not a win).

The plan's data (Fashion-MNIST by default) must be on this machine: when its IDX files are
missing and this is a Debian machine run as root, ``apt-get install -y dataset-fashion-mnist``
installs them; otherwise the benchmark stops at once with a one-line error saying what to install
or where to put the files.

Outputs (``--out``, default ``experiments/results``): ``benchmark.md`` (a table per model, the
main table, the verdicts and the command that made them), ``benchmark.json`` (every search),
``benchmark_frontier.png`` (test accuracy after the fine-tune vs FLOPs ratio per searcher, the
dense model dashed) and ``benchmark_curves.png`` (best search accuracy so far vs evaluations at
the main budget).

Interrupting is safe: every finished group is appended to ``<out>/benchmark_runs.jsonl`` and
``--resume`` skips those (an interrupted group is re-run); a run without ``--resume`` starts a
new record and keeps the previous one as ``benchmark_runs.<time>.jsonl``. ``--stop-after
MINUTES`` starts no new group once the run has lasted that long (the running one finishes).

    python experiments/benchmark.py                      # the full benchmark
    python experiments/benchmark.py --models resnet20 --budgets flops=0.5   # the headline slice
    python experiments/benchmark.py --models resnet20 --budgets flops=0.25 --seeds 0 \\
        --evaluations 30 --no-extra --out /tmp/bench     # a small slice
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from autoprune.agents import get_searcher

from autoprune.budget import Budget
from autoprune.config import ConfigError
from autoprune.costs.measure import measure_latencies
from autoprune.runner.experiment import (
    ExperimentConfig,
    Hooks,
    Outcome,
    experiment_config,
    run_experiment,
)
from autoprune.runner.sweep import mean_std, plot_frontier
from autoprune.task import Task, build_task
from autoprune.tracking.tracker import TrackingError, TrackingStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_revision  # this folder's module

HERE = Path(__file__).resolve().parent
PLAN_KEYS = {
    "experiment", "searchers", "budgets", "seeds", "deterministic", "finetune_epochs", "workers",
    "task", "options", "models", "extra", "finetune_batches", "main_budget", "agent",
    "own_evaluations",
}  # fmt: skip
MODEL_KEYS = {"evaluations", "options", "seeds", "checkpoint"}
MAIN_BUDGET = "flops=0.25"  # the default main budget (the plan's ``main_budget``)
LATENCY_REPEATS = 20
# How a group's latencies were timed (recorded with the group). Groups recorded without it timed
# each pruned model as its search ended, while the other Ray worker still searched, and the dense
# model alone before the searches: their ratios are noisy (off by up to 0.05 either way).
# Version 2 timed all the group's models after the searches, one pass each per round: a round of
# 14 models evicts each other's kernels from oneDNN's primitive cache, and the pruned models'
# ratios came out inflated (MobileNetV2: 0.58-0.80 against 0.33-0.43 timed warm).
# Version 3 timed them warm (an untimed pass right before each timed one) in the same rounds:
# still inflated on MobileNetV2 (0.52-0.66 against 0.33-0.43 in pairs).
LATENCY_TIMING = (
    "after the group's searches, each pruned model in a pair with the dense model, interleaved "
    "and warm"
)
LATENCY_TIMING_VERSION = 4  # recorded as ``latency_timing_version``; older groups lack it


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Group:
    """One experiment of the benchmark: a model, a granularity and a budget, all its searchers."""

    model: str
    granularity: str
    budget: str
    searchers: tuple[str, ...]
    evaluations: int
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per-model overrides
    criterion: str | None = None  # None: the plan's
    seeds: tuple[int, ...] | None = None  # None: the plan's
    checkpoint: str | None = None  # None: the model's default (cached) checkpoint

    @property
    def key(self) -> str:
        return f"{self.model}/{self.granularity}/{self.budget}"


@dataclass
class Plan:
    experiment: str
    seeds: list[int]
    deterministic: list[str]
    finetune_epochs: int
    workers: int
    task: dict[str, Any]
    options: dict[str, dict[str, Any]]
    groups: list[Group] = field(default_factory=list)
    finetune_batches: int | None = None
    main_budget: str = MAIN_BUDGET
    agent: str = "ddpg"
    # Searchers whose evaluation count the model sets (sensitivity: units x grid + 2): they do
    # not get the group's equal evaluations, which would only be a limit they fail.
    own_evaluations: list[str] = field(default_factory=lambda: ["sensitivity"])

    def config(self, group: Group, tracking_uri: str | None) -> ExperimentConfig:
        """The group's experiment config (validated: bad input fails before any work)."""
        options = {k: dict(v) for k, v in self.options.items() if k in group.searchers}
        for name, items in group.options:
            if name in group.searchers:
                options.setdefault(name, {}).update(dict(items))
        seeds = list(group.seeds) if group.seeds is not None else self.seeds
        for name in group.searchers:  # equal evaluations for every searcher with a choice
            if get_searcher(name).fixed_evaluations is None and name not in self.own_evaluations:
                options.setdefault(name, {}).setdefault("evaluations", group.evaluations)
        for name in self.deterministic:
            if name in group.searchers:
                options.setdefault(name, {})["seeds"] = seeds[:1]
        data = {
            **self.task,
            "model": {
                **self.task.get("model", {}),
                "name": group.model,
                **({"checkpoint": group.checkpoint} if group.checkpoint else {}),
            },
            "granularity": group.granularity,
            **({"criterion": group.criterion} if group.criterion else {}),
            "search": {
                "searchers": list(group.searchers),
                "budget": group.budget,
                "seeds": seeds,
                "workers": self.workers,
                "options": options,
                "finetune_epochs": self.finetune_epochs,
                "finetune_batches": self.finetune_batches,
            },
            "tracking": {"uri": tracking_uri, "experiment": self.experiment},
        }
        return experiment_config(data)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def load_plan(path: Path, args: argparse.Namespace) -> Plan:
    """The plan of ``path`` narrowed by the command line; every group validated."""
    if not path.is_file():
        raise ConfigError(f"benchmark plan {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    plan_path = path
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(PLAN_KEYS)}")
    models: dict[str, dict[str, Any]] = dict(raw.get("models") or {})
    if args.models:
        missing = sorted(set(args.models) - set(models))
        if missing:
            raise ConfigError(f"--models: {missing} not in the plan; it has {sorted(models)}")
        models = {m: models[m] for m in args.models}
    searchers = args.searchers or list(raw.get("searchers") or [])
    budgets = args.budgets or list(raw.get("budgets") or [])
    for b in budgets:
        Budget.parse(b)
    seeds = [int(s) for s in (args.seeds or raw.get("seeds") or [0])]
    workers = raw.get("workers")
    workers = int(args.workers if args.workers is not None else (workers or os.cpu_count() or 1))
    plan = Plan(
        experiment=args.experiment or str(raw.get("experiment", "benchmark")),
        seeds=seeds,
        deterministic=list(raw.get("deterministic") or []),
        finetune_epochs=int(
            args.finetune_epochs
            if args.finetune_epochs is not None
            else raw.get("finetune_epochs", 1)
        ),
        workers=workers,
        task=dict(raw.get("task") or {}),
        options=dict(raw.get("options") or {}),
        finetune_batches=raw.get("finetune_batches"),
        main_budget=str(raw.get("main_budget", MAIN_BUDGET)),  # as the groups spell it
        agent=str(raw.get("agent", "ddpg")),
        own_evaluations=list(raw.get("own_evaluations", ["sensitivity"])),
    )

    def evaluations(spec: dict[str, Any]) -> int:
        if args.evaluations is not None:
            return int(args.evaluations)
        return int(spec.get("evaluations", 100))

    def model_options(spec: dict[str, Any]) -> tuple:
        unknown = sorted(set(spec) - MODEL_KEYS)
        if unknown:
            raise ConfigError(f"models: unknown key(s) {unknown}; known: {sorted(MODEL_KEYS)}")
        opts = spec.get("options") or {}
        return tuple((name, tuple(sorted(dict(o).items()))) for name, o in opts.items())

    def model_checkpoint(spec: dict[str, Any]) -> str | None:
        """A shipped checkpoint (relative to the plan's folder): the same weights on every
        machine, so groups measured on different machines compare and a clone resumes."""
        if not spec.get("checkpoint"):
            return None
        path = Path(spec["checkpoint"])
        path = path if path.is_absolute() else plan_path.parent / path
        if not path.is_file():
            raise ConfigError(f"models: checkpoint {path} not found")
        return str(path)

    def model_seeds(spec: dict[str, Any]) -> tuple[int, ...] | None:
        if args.seeds or "seeds" not in spec:  # --seeds wins over the plan's per-model seeds
            return None
        return tuple(int(x) for x in spec["seeds"])

    for model, spec in models.items():
        spec = spec or {}
        for budget in budgets:
            plan.groups.append(
                Group(
                    model, "channel", budget, tuple(searchers), evaluations(spec),
                    model_options(spec), seeds=model_seeds(spec),
                    checkpoint=model_checkpoint(spec),
                )
            )  # fmt: skip
    if not args.no_extra:
        for extra in raw.get("extra") or []:
            model = extra["model"]
            if model not in models:
                continue
            if args.budgets and str(Budget.parse(str(extra["budget"]))) not in {
                str(Budget.parse(b)) for b in args.budgets
            }:  # --budgets narrows the granularity groups too
                continue
            granularity = extra["granularity"]
            names = [
                s for s in extra.get("searchers", searchers)
                if s in searchers
                and not (granularity != "channel" and get_searcher(s).channel_only)
            ]  # fmt: skip
            if names:
                spec = models[model] or {}
                plan.groups.append(
                    Group(
                        model, granularity, str(extra["budget"]), tuple(names),
                        evaluations(spec), model_options(spec), extra.get("criterion"),
                        model_seeds(spec), model_checkpoint(spec),
                    )
                )  # fmt: skip
    Budget.parse(plan.main_budget)
    if args.granularities:
        unknown = sorted(set(args.granularities) - {"channel", "fine", "nm"})
        if unknown:
            raise ConfigError(f"--granularities: unknown {unknown}; choose from channel, fine, nm")
        plan.groups = [g for g in plan.groups if g.granularity in args.granularities]
    if not plan.groups:
        raise ConfigError("the benchmark plan has no group (models x budgets) to run")
    for group in plan.groups:
        try:
            plan.config(group, None)
        except ConfigError as err:
            raise ConfigError(f"group {group.key}: {err}") from None
    return plan


# ------------------------------------------------------------------ data


def ensure_data(plan: Plan, install: bool = True) -> str | None:
    """Make sure the plan's IDX data is here before any work; None when it is, else the error.

    When Fashion-MNIST's default folder is missing and this is a Debian machine run as root,
    ``apt-get install -y dataset-fashion-mnist`` installs it (``apt-get update`` first when the
    package is unknown)."""
    import shutil
    import subprocess

    from autoprune.config import DataConfig
    from autoprune.data.core import DataError
    from autoprune.data.idx import idx_folder

    data = dict(plan.task.get("data") or {})
    if data.get("name") not in ("fashion_mnist", "mnist"):
        return None
    cfg = DataConfig(**data)

    def check() -> str | None:
        try:
            idx_folder(cfg)
            return None
        except DataError as err:
            return str(err)

    problem = check()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if problem is None or not install or cfg.name != "fashion_mnist" or cfg.path is not None:
        return problem
    if not root or shutil.which("apt-get") is None:
        return problem + " (run as root on Debian to have it installed, or set data.path)"
    print("benchmark: installing dataset-fashion-mnist with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
    done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{problem}; apt-get install dataset-fashion-mnist failed: {last}"
    return check()


# ------------------------------------------------------------------ running


class CheckpointMismatch(RuntimeError):
    """A resumed benchmark whose model is not the one its recorded groups were measured on."""


def recorded_models(done: list[dict]) -> dict[str, dict]:
    """The checkpoint (digest, or the dense test accuracy of records that predate it) each
    model's recorded groups were measured on: model -> the first recorded group."""
    out: dict[str, dict] = {}
    for g in done:
        out.setdefault(g["group"].split("/", 1)[0], g)
    return out


def table_ratios(task: Task, budget: str, policies: list[dict[str, float]]) -> list[float | None]:
    """The lookup table's latency ratio of each policy, for a latency budget (what the searches
    had to meet; the measured ratio is beside it in the report); None for other budgets."""
    if "latency" not in Budget.parse(budget).metrics:
        return [None] * len(policies)
    return [task.cost_ratios(task.ratio_vector(p), ("latency",))["latency"] for p in policies]


def time_group(
    task: Task, budget: str, batch: int, policies: list[dict[str, float] | None]
) -> tuple[float, list[dict[str, float | None]]]:
    """The dense model's latency (ms) and, per policy, the latency of the model it prunes to,
    its ratio to the dense one and the table's ratio (:func:`table_ratios`), with nothing else
    running (call it after the searches: a model timed beside a running search competes with
    it for the cores). Each pruned model is timed in a pair with the dense model, interleaved
    (``dense_pair_ms``: the dense model's timing in that pair; the ratio is of the pair), and
    the group's dense latency is the median of those: timed together in rounds of all the
    group's models, pruned MobileNetV2s measured 0.52-0.80 of the dense latency that they
    measure at 0.33-0.43 alone or in pairs. A None policy (a search that found none) gets None
    values."""
    table = iter(table_ratios(task, budget, [p for p in policies if p is not None]))
    out: list[dict[str, float | None]] = []
    dense: list[float] = []
    for policy in policies:
        if policy is None:
            out.append({"latency_ms": None, "latency_ratio": None, "latency_table_ratio": None,
                        "dense_pair_ms": None})  # fmt: skip
            continue
        d, q = (
            1e3 * s for s in time_models([task.model, task.prune(policy)], task.input_shape, batch)
        )
        dense.append(d)
        out.append({"latency_ms": q, "latency_ratio": q / d, "latency_table_ratio": next(table),
                    "dense_pair_ms": d})  # fmt: skip
    if not dense:
        dense = [1e3 * time_models([task.model], task.input_shape, batch)[0]]
    return statistics.median(dense), out


def _ratios(policy: Any) -> dict[str, float] | None:
    return None if policy is None else {str(k): float(v) for k, v in policy.ratios.items()}


def time_models(models: list[Any], input_shape: tuple[int, ...], batch: int) -> list[float]:
    """Seconds per forward pass of each model (median of ``LATENCY_REPEATS`` interleaved rounds,
    one thread)."""
    return measure_latencies(models, input_shape, batch, threads=1, repeats=LATENCY_REPEATS)


class BenchHooks(Hooks):
    """Progress lines, the dense model's test accuracy and checkpoint, each search's curve."""

    def __init__(
        self, group: Group, index: int, total: int, start: float, recorded: dict | None = None
    ) -> None:
        self.group, self.index, self.total, self.start = group, index, total, start
        self.recorded = recorded  # the model's earlier group, when resuming
        self.checkpoint: str | None = None
        self.task: Task | None = None
        self.dense_test_accuracy = float("nan")
        self.extra: dict[tuple[str, int], dict[str, Any]] = {}
        self._started = 0.0
        self._best = float("nan")
        self._count = 0

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
        same = (
            digest == self.checkpoint
            if digest is not None
            else abs(old.get("dense_test_accuracy", -1.0) - self.dense_test_accuracy) < 1e-9
        )
        if not same:
            was = (
                f"checkpoint {digest}"
                if digest
                else (f"a checkpoint with test accuracy {old.get('dense_test_accuracy')}")
            )
            raise CheckpointMismatch(
                f"{self.group.key}: the recorded group {old['group']} was measured on {was}; "
                f"this machine's {self.group.model} is checkpoint {self.checkpoint} (test "
                f"accuracy {self.dense_test_accuracy}), another model: rerun without --resume, "
                "or set the recorded checkpoint as model.checkpoint"
            )  # fmt: skip

    def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None:
        self._started = time.perf_counter()
        self._best, self._count = float("nan"), 0
        self.say(f"{searcher} seed {seed}: started ({total or 'own'} evaluations)")

    def evaluation(self, record: Any, result: Any) -> None:
        self._count += 1
        if result.best is not None:
            self._best = result.best.accuracy
        if self._count % 25 == 0:
            best = "-" if np.isnan(self._best) else f"{100 * self._best:.1f}%"
            self.say(f"  {self._count} evaluations, best so far {best}")

    def search_finished(self, outcome: Outcome) -> None:
        extra: dict[str, Any] = {"curve": []}
        if outcome.result is not None:
            extra["curve"] = [None if np.isnan(v) else v for v in outcome.result.best_so_far()]
        extra["wall_seconds"] = time.perf_counter() - self._started
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
) -> dict:
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
        row = {
            "group": group.key,
            "model": group.model,
            "granularity": group.granularity,
            "budget": group.budget,
            **outcome.row(),
            **hooks.extra.get((outcome.searcher, outcome.seed), {}),
            "ratios": ratios,
            **timing,
            "deterministic": outcome.searcher in plan.deterministic,
        }
        rows.append(row)
    return {
        "group": group.key,
        "parent_run": result.parent_id,
        "started": started,
        "command": command,
        "seconds": time.perf_counter() - t0,
        "dense_latency_ms": dense_ms,
        "latency_timing": LATENCY_TIMING,
        "latency_timing_version": LATENCY_TIMING_VERSION,
        "latency_batch": batch,
        "dense_test_accuracy": hooks.dense_test_accuracy,
        "checkpoint": hooks.checkpoint,
        "revision": revision,
        "rows": rows,
    }


# ------------------------------------------------------------------ report


def _fmt(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    s = mean_std(values)
    if s is None:
        return "-"
    mean, spread, _ = s
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


def cells(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (group, searcher), in run order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["group"], r["searcher"]), []).append(r)
    return out


def _mean(rows: list[dict], key: str) -> tuple[float, float] | None:
    s = mean_std([r.get(key) for r in rows])
    return None if s is None else (s[0], s[1])


COLUMNS = (
    ("best search acc %", "best_search_accuracy", 100, 1),
    ("test acc % (no FT)", "test_accuracy", 100, 1),
    ("test acc % (FT)", "test_accuracy_finetuned", 100, 1),
    ("FLOPs ratio", "flops_ratio", 1, 3),
    ("params ratio", "params_ratio", 1, 3),
    ("latency ratio", "latency_ratio", 1, 3),
    ("latency ms", "latency_ms", 1, 2),
    ("table latency ratio", "latency_table_ratio", 1, 3),
    ("evaluations", "evaluations", 1, 0),
    ("wall s", "wall_seconds", 1, 0),
)


def model_table(model: str, rows: list[dict], groups: list[str]) -> list[str]:
    by_cell = cells(rows)
    head = ["budget", "granularity", "searcher", *[c[0] for c in COLUMNS], "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in groups:
        g_model, granularity, budget = key.split("/", 2)
        if g_model != model:
            continue
        for (gk, searcher), cell in by_cell.items():
            if gk != key:
                continue
            seeds = "1 (deterministic)" if cell[0].get("deterministic") else str(len(cell))
            values = [_fmt([r.get(k) for r in cell], s, d) for _, k, s, d in COLUMNS]
            lines.append(
                f"| {budget} | {granularity} | {searcher} | {' | '.join(values)} | {seeds} |"
            )
    return lines


def main_table(
    rows: list[dict],
    models: list[str],
    searchers: list[str],
    key: str = "test_accuracy",
    main_budget: str = MAIN_BUDGET,
) -> list[str]:
    """Test accuracy at the main budget, searchers x models; the best per model bold."""
    by_cell = cells(rows)
    lines = [
        "| searcher | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    best: dict[str, float] = {}
    for m in models:
        means = [_mean(by_cell.get((f"{m}/channel/{main_budget}", s), []), key) for s in searchers]
        best[m] = max((x[0] for x in means if x is not None), default=float("nan"))
    for s in searchers:
        out = []
        for m in models:
            stat = _mean(by_cell.get((f"{m}/channel/{main_budget}", s), []), key)
            if stat is None:
                out.append("-")
                continue
            text = f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"
            out.append(f"**{text}**" if stat[0] == best[m] else text)
        lines.append(f"| {s} | " + " | ".join(out) + " |")
    return lines


METRICS = (("test_accuracy", "no FT"), ("test_accuracy_finetuned", "after the same fine-tune"))


def group_verdict(
    rows: list[dict], group: str, key: str, agent: str = "ddpg"
) -> dict[str, Any] | None:
    """The verdict on one group and accuracy column, from the rows alone.

    ``best``: the searcher with the highest mean. ``agent_wins``: the agent has the highest mean
    *and* leads the runner-up by more than the larger of the two seed standard deviations, with
    at least two seeds of its own (a lead inside the spread is not a win). ``lead`` is the agent's
    mean minus the best other searcher's mean (negative: behind), ``spread`` that larger std.
    None when the group has no rows with this column.
    """
    stats = {
        s: _stat for (g, s), cell in cells(rows).items()
        if g == group and (_stat := mean_std([r.get(key) for r in cell])) is not None
    }  # fmt: skip
    if not stats:
        return None
    best = max(stats, key=lambda s: stats[s][0])
    out: dict[str, Any] = {"group": group, "key": key, "best": best,
                           "best_mean": stats[best][0], "agent": agent}  # fmt: skip
    if agent not in stats:
        return {**out, "agent_wins": False, "lead": None, "spread": None, "rival": None}
    others = {s: v for s, v in stats.items() if s != agent}
    if not others:
        return {**out, "agent_wins": False, "lead": None, "spread": None, "rival": None}
    rival = max(others, key=lambda s: others[s][0])
    mine = stats[agent]
    lead = mine[0] - others[rival][0]
    spread = max(mine[1], others[rival][1])
    wins = lead > spread and mine[2] >= 2
    return {**out, "agent_wins": wins, "lead": lead, "spread": spread, "rival": rival,
            "agent_seeds": mine[2]}  # fmt: skip


def verdict_line(v: dict[str, Any]) -> str:
    head = f"- {v['group']}: best `{v['best']}` {100 * v['best_mean']:.1f}%"
    if v["lead"] is None:
        return head + f"; no `{v['agent']}` rows to judge"
    lead, spread = 100 * v["lead"], 100 * v["spread"]
    if v["agent_wins"]:
        judged = (
            f"**`{v['agent']}` wins**: +{lead:.1f} points over `{v['rival']}` > spread {spread:.1f}"
        )
    elif lead > 0:
        why = "one seed" if v.get("agent_seeds", 0) < 2 else f"inside the spread {spread:.1f}"
        judged = (f"`{v['agent']}` leads `{v['rival']}` by {lead:.1f} points, {why}: "
                  "**not a win**")  # fmt: skip
    else:
        judged = (f"`{v['agent']}` is {-lead:.1f} points behind `{v['rival']}` "
                  f"(spread {spread:.1f}): **not a win**")  # fmt: skip
    return f"{head}; {judged}"


def verdicts(rows: list[dict], groups: list[str], agent: str = "ddpg") -> list[str]:
    """Per accuracy column and group: the best searcher and whether the agent wins."""
    out: list[str] = []
    for key, label in METRICS:
        judged = [v for g in groups if (v := group_verdict(rows, g, key, agent)) is not None]
        if not judged:
            continue
        wins = sum(v["agent_wins"] for v in judged)
        out += [f"Test accuracy {label}: `{agent}` wins {wins} of {len(judged)} groups.", ""]
        out += [verdict_line(v) for v in judged] + [""]
    return out


def revisions_note(done: list[dict]) -> str:
    """' Code: <revision> (groups ...)' per recorded revision; '' for records without one."""
    by: dict[str, list[str]] = {}
    for g in done:
        by.setdefault(g.get("revision") or "not recorded", []).append(g["group"])
    if list(by) == ["not recorded"]:
        return ""
    if len(by) == 1:
        return f" Code: revision {next(iter(by))}."
    return " Code: " + "; ".join(f"{r} ({', '.join(gs)})" for r, gs in by.items()) + "."


def _timed_now(record: dict) -> bool:
    return bool(record.get("latency_timing_version") == LATENCY_TIMING_VERSION)


def latency_note(done: list[dict]) -> str:
    """How the groups' latencies were timed, naming the groups timed the old ways."""
    old = [g["group"] for g in done if not _timed_now(g) and "latency_timing_version" not in g]
    rounds = [g["group"] for g in done if not _timed_now(g) and "latency_timing_version" in g]
    text = f" Latencies are timed {LATENCY_TIMING}, nothing else running"
    if not old and not rounds:
        return text + "."
    parts = []
    if old:
        parts.append(f"in {', '.join(old)} each pruned model was timed as its search ended, "
                     "beside the other worker's search, and the dense model alone before the "
                     "searches, so their latency ratios are noisy (off by up to 0.05 either way "
                     "in the groups timed again)")  # fmt: skip
    if rounds:
        parts.append(f"in {', '.join(rounds)} all the group's models were timed together, in "
                     "rounds of one pass each, which inflates the pruned models' ratios (on "
                     "MobileNetV2 up to twice their ratio in pairs)")  # fmt: skip
    return (text + ", except: " + "; ".join(parts) + ". `--retime-latency` times them again "
            "where the policies are recorded.")  # fmt: skip


def missing_note(plan: Plan, done: list[dict]) -> list[str]:
    """A paragraph naming the plan's groups not recorded yet (none when the plan is complete)."""
    recorded = {g["group"] for g in done}
    missing = [g.key for g in plan.groups if g.key not in recorded]
    if not missing:
        return []
    return [f"**Partial: {len(recorded)} of {len(plan.groups)} groups recorded.** Not yet run: "
            f"{', '.join(missing)} (`--resume` runs them).", ""]  # fmt: skip


def write_report(
    out: Path, plan: Plan, done: list[dict], command: str, started: str, minutes: float
) -> None:
    rows = [r for g in done for r in g["rows"]]
    groups = [g["group"] for g in done]
    models = list(dict.fromkeys(r["model"] for r in rows))
    searchers = list(dict.fromkeys(r["searcher"] for r in rows))
    main = plan.main_budget
    data = str((plan.task.get("data") or {}).get("name", "digits"))
    seeds = "seeds " + ", ".join(
        f"{m} {sorted({r['seed'] for r in rows if r['model'] == m and not r['deterministic']})}"
        for m in models
    )  # the seeds the recorded rows ran (a report rebuilt later names them, not the plan's)
    (out / "benchmark.json").write_text(json.dumps(done, indent=1))
    lines = [
        f"# autoprune benchmark  {started}",
        "",
        f"{command}: {minutes:.1f} min wall (sum over groups) on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {plan.workers} Ray workers; "
        f"{seeds} ({', '.join(plan.deterministic)}: one run, deterministic); "
        f"fine-tune {plan.finetune_epochs} epoch(s)"
        + (f" capped at {plan.finetune_batches} batches" if plan.finetune_batches else "")
        + f"; MLflow experiment `{plan.experiment}`."
        + revisions_note(done),
        "",
        *missing_note(plan, done),
        f"Accuracies are on the {data} test split (never seen by the searches) of the best policy "
        "of each search, with adaptive BN only (no FT) and after the same fine-tune (FT); "
        "latency is measured (median of "
        f"{LATENCY_REPEATS}, batch {plan.task.get('eval', {}).get('latency_batch_size', 1)}, "
        "1 thread) and given as a ratio to the dense model. Mean ± std over seeds."
        + latency_note(done),
        "",
        f"## Main table: test accuracy % (no FT) at {main}",
        "",
        *main_table(rows, models, searchers, main_budget=main),
        "",
        f"Test accuracy % after the same fine-tune at {main}:",
        "",
        *main_table(rows, models, searchers, "test_accuracy_finetuned", main),
        "",
        "## Verdicts (computed from the rows)",
        "",
        *verdicts(rows, groups, plan.agent),
        "",
    ]
    for m in models:
        first = next(g for g in done if g["group"].startswith(m + "/"))
        lines += [f"## {m}", ""]
        dense = f"Dense model: latency {first['dense_latency_ms']:.2f} ms"
        if first.get("dense_test_accuracy") is not None:
            dense += f", test accuracy {100 * first['dense_test_accuracy']:.1f}%"
        lines += [dense + ".", ""]
        lines += [*model_table(m, rows, groups), ""]
    (out / "benchmark.md").write_text("\n".join(lines))
    dense_acc = {g["group"].split("/", 1)[0]: g.get("dense_test_accuracy") for g in done}
    plot_report(out, rows, models, main, dense_acc)


def plot_report(
    out: Path,
    rows: list[dict],
    models: list[str],
    main_budget: str = MAIN_BUDGET,
    dense: dict[str, float | None] | None = None,
) -> None:
    from matplotlib.figure import Figure

    n = len(models)
    fig = Figure(figsize=(5 * n, 4))
    for i, m in enumerate(models):
        ax = fig.add_subplot(1, n, i + 1)
        pts = [r for r in rows if r["model"] == m and r["granularity"] == "channel"
               and r["budget"].startswith("flops")]  # fmt: skip
        tuned = any(r.get("test_accuracy_finetuned") is not None for r in pts)
        key = "test_accuracy_finetuned" if tuned else "test_accuracy"
        plot_frontier(pts, key, "flops_ratio", title=m, ax=ax)
        ref = (dense or {}).get(m)
        if ref is not None and np.isfinite(ref):
            ax.axhline(100 * ref, color="black", linestyle="--", linewidth=1, label="dense")
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "benchmark_frontier.png", dpi=90)

    fig = Figure(figsize=(5 * n, 4))
    for i, m in enumerate(models):
        ax = fig.add_subplot(1, n, i + 1)
        curves: dict[str, list[list[float]]] = {}
        for r in rows:
            if r["group"] == f"{m}/channel/{main_budget}" and r.get("curve"):
                curves.setdefault(r["searcher"], []).append(
                    [np.nan if v is None else 100 * v for v in r["curve"]]
                )
        for searcher, runs in curves.items():
            length = min(len(c) for c in runs)
            values = np.array([c[:length] for c in runs])
            if length > 1 and not np.isnan(values).any():  # a curve from the first evaluation
                ax.plot(np.arange(1, length + 1), values.mean(axis=0), label=searcher)
            else:  # greedy / one-shot searchers: where they ended (mean over seeds)
                ends = [(len(c), np.nanmax(c)) for c in runs if not np.isnan(c).all()]
                if ends:
                    x, y = np.mean(ends, axis=0)
                    ax.plot([x], [y], "o", label=f"{searcher} (final)")
        ax.set_title(f"{m}, {main_budget}")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("best search accuracy so far %")
        if curves:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "benchmark_curves.png", dpi=90)


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", type=Path, default=HERE / "benchmark.yaml")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--models", type=_csv, help="comma-separated subset of the plan's models")
    p.add_argument("--budgets", type=_csv, help="comma-separated, e.g. flops=0.5,flops=0.25")
    p.add_argument("--searchers", type=_csv)
    p.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t) or []])
    p.add_argument("--evaluations", type=int, help="episodes of ddpg/random for every model")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--no-extra", action="store_true", help="skip the fine / 2:4 rows")
    p.add_argument("--granularities", type=_csv,
                   help="only the groups of these granularities, e.g. fine,nm (the plan's "
                        "fine / 2:4 groups without the channel ones)")  # fmt: skip
    p.add_argument("--experiment", help="MLflow experiment (default: the plan's)")
    p.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///mlflow.db)")
    p.add_argument("--resume", action="store_true", help="skip the groups already in --out")
    p.add_argument(
        "--stop-after",
        type=float,
        metavar="MINUTES",
        help="start no group once this run has lasted MINUTES (the running group finishes; "
        "the report covers the groups recorded; go on with --resume)",
    )
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the groups in --out; run nothing")  # fmt: skip
    p.add_argument("--retime-latency", action="store_true",
                   help="time again, interleaved with the dense model, the latency of the "
                        "recorded groups timed the old way (policies from the record or from "
                        "MLflow); rewrite the record and the report; search nothing")  # fmt: skip
    return p.parse_args(argv)


def recorded_groups(log: Path, plan: Plan) -> list[dict]:
    """The groups of ``plan`` recorded in ``log`` (the last record of a group wins)."""
    keys = {g.key for g in plan.groups}
    found: dict[str, dict] = {}
    if log.is_file():
        for number, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed while writing: that group runs again
                print(f"warning: {log}:{number} is not a whole record; skipped", file=sys.stderr)
                continue
            if isinstance(record, dict) and record.get("group") in keys:
                found[record["group"]] = record
    return list(found.values())


def report_only(args: argparse.Namespace, plan: Plan) -> int:
    """Rewrite the report from what ``--out`` records, running nothing (a partial plan too)."""
    log = args.out / "benchmark_runs.jsonl"
    done = recorded_groups(log, plan)
    if not done:
        print(f"error: no group of this plan is recorded in {log}", file=sys.stderr)
        return 2
    order = [g.key for g in plan.groups]
    done.sort(key=lambda g: order.index(g["group"]))
    minutes = sum(g["seconds"] for g in done) / 60
    commands = sorted({g.get("command", "python experiments/benchmark.py") for g in done})
    started = min((g["started"] for g in done if "started" in g), default="?")
    write_report(args.out, plan, done, " + ".join(f"`{c}`" for c in commands), started, minutes)
    print(f"{len(done)} of {len(order)} groups: {args.out / 'benchmark.md'}")
    return 0


def _group_policies(record: dict, store: Any) -> list[dict[str, float] | None]:
    """The best policy's ratios of every row of a recorded group: from the row, or from the
    search's MLflow run (``best_policy.json``); None for a search that found no policy (its row
    has no latency). Raises TrackingError when a run lacks the policy it should have."""
    policies: list[dict[str, float] | None] = []
    for row in record["rows"]:
        if "ratios" in row:
            ratios = row["ratios"]
        elif row.get("latency_ms") is None:  # recorded the old way, without a policy
            ratios = None
        else:
            ratios = store().best_policy(run_id=row["run_id"])[0]["ratios"]
        policies.append(None if ratios is None else {str(k): float(v) for k, v in ratios.items()})
    return policies


def _replace_records(log: Path, records: dict[str, dict]) -> None:
    """Rewrite ``log`` with the last record of each named group replaced (atomically)."""
    lines = log.read_text().splitlines()
    last: dict[str, int] = {}
    for i, line in enumerate(lines):
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("group") in records:
                last[record["group"]] = i
    for key, i in last.items():
        lines[i] = json.dumps(records[key])
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, log)


def _retime_group(
    record: dict, group: Group, plan: Plan, tracking_uri: str | None, store: Any
) -> None:
    """Time one recorded group again (:func:`time_group`) and update ``record`` in place."""
    policies = _group_policies(record, store)
    task = build_task(plan.config(group, tracking_uri).task())
    # A channel-pruned model's latency follows its channel counts, which the policy and the
    # architecture fix; still, a record made on other weights is another model's.
    if record.get("checkpoint") not in (None, task.checkpoint_hash):
        raise ValueError(f"it was measured on checkpoint {record['checkpoint']}, this machine's "
                         f"{group.model} is {task.checkpoint_hash}")  # fmt: skip
    batch = int(record.get("latency_batch", task.config.eval.latency_batch_size))
    count = sum(p is not None for p in policies)
    print(f"{group.key}: timing {count} pruned models with the dense one", flush=True)
    dense_ms, timed = time_group(task, group.budget, batch, policies)
    for row, ratios, timing in zip(record["rows"], policies, timed, strict=True):
        row.update(ratios=ratios, **timing)
    record.update(dense_latency_ms=dense_ms, latency_timing=LATENCY_TIMING,
                  latency_timing_version=LATENCY_TIMING_VERSION, latency_batch=batch,
                  latency_retimed=dt.datetime.now().strftime("%Y-%m-%d %H:%M"))  # fmt: skip


def retime_latency(args: argparse.Namespace, plan: Plan) -> int:
    """Time again the latency of the recorded groups that were timed an older way (beside
    running searches, or cold: see ``LATENCY_TIMING``): each group's pruned models with the
    dense one, interleaved and warm, with nothing else running. Every group is written back as
    soon as it is timed."""
    log = args.out / "benchmark_runs.jsonl"
    done = recorded_groups(log, plan)
    if not done:
        print(f"error: no group of this plan is recorded in {log}", file=sys.stderr)
        return 2
    problem = ensure_data(plan)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    opened: list[TrackingStore] = []

    def store() -> TrackingStore:
        if not opened:
            opened.append(TrackingStore(args.tracking_uri))
        return opened[0]

    groups = {g.key: g for g in plan.groups}
    left = 0
    for record in done:
        key = record["group"]
        if _timed_now(record):
            print(f"{key}: already timed {LATENCY_TIMING}")
            continue
        try:
            _retime_group(record, groups[key], plan, args.tracking_uri, store)
        except (TrackingError, ValueError, OSError) as err:  # config, model, data, policy
            print(f"{key}: left as recorded: {err}")
            left += 1
            continue
        _replace_records(log, {key: record})
    report_only(args, plan)
    return 1 if left else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stop_after is not None and not args.stop_after >= 0:
        print(f"error: --stop-after must be >= 0 minutes, not {args.stop_after}", file=sys.stderr)
        return 2
    try:
        plan = load_plan(args.plan, args)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report_only:
        return report_only(args, plan)
    if args.retime_latency:
        return retime_latency(args, plan)
    problem = ensure_data(plan)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "benchmark_runs.jsonl"
    done: list[dict] = []
    if args.resume and log.is_file():
        done = recorded_groups(log, plan)
    elif log.exists():  # a new benchmark; the previous record is kept, not overwritten
        stamp = dt.datetime.fromtimestamp(log.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        log.rename(log.with_name(f"benchmark_runs.{stamp}.jsonl"))
    finished = {g["group"] for g in done}
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    command = " ".join(["python experiments/benchmark.py", *given])
    revision = code_revision()  # the code this process imported, not a later commit
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    print(
        f"benchmark: {len(plan.groups)} groups, {len(finished)} already done; "
        f"{plan.workers} Ray workers; MLflow experiment {plan.experiment!r}",
        flush=True,
    )
    ran = 0
    try:
        for i, group in enumerate(plan.groups, 1):
            if group.key in finished:
                continue
            elapsed = (time.perf_counter() - t0) / 60
            if ran and args.stop_after is not None and elapsed >= args.stop_after:
                left = sum(g.key not in {d["group"] for d in done} for g in plan.groups)
                print(f"stopped after {elapsed:.1f} min (--stop-after {args.stop_after:g}): "
                      f"{left} groups left; go on with --resume", flush=True)  # fmt: skip
                break
            ran += 1
            hooks = BenchHooks(group, i, len(plan.groups), t0,
                               recorded_models(done).get(group.model))  # fmt: skip
            result = run_group(plan, group, hooks, args.tracking_uri, command, revision)
            done.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
    except KeyboardInterrupt:
        print(f"interrupted: {len(done)} groups recorded in {log}; rerun with --resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except CheckpointMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    order = [g.key for g in plan.groups]
    done.sort(key=lambda g: order.index(g["group"]))
    # The benchmark's time: every group's wall time (also across --resume), task builds included.
    minutes = sum(g["seconds"] for g in done) / 60
    # The command and start of the groups' own runs (a --resume only rewrites the report).
    commands = sorted({g.get("command", command) for g in done})
    started = min((g["started"] for g in done if "started" in g), default=now)
    write_report(args.out, plan, done, " + ".join(f"`{c}`" for c in commands), started, minutes)
    print(f"done in {minutes:.1f} min: {args.out / 'benchmark.md'}")
    print((args.out / "benchmark.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
