"""The benchmark's report: tables, verdicts and the report files, from the recorded groups.

Each cell (group x searcher) reports mean and spread (std over seeds) of the best search
accuracy, the test accuracy of the best policy before and after the same fine-tune, the achieved
cost ratios, the measured latency, evaluations and wall time. A verdict per group, computed from
the rows, names the best searcher and says whether the agent leads by more than the seeds'
spread (a lead inside the spread is not a win).

Files (in the output folder): ``benchmark.md`` (a table per model, the main table, the verdicts
and the command that made them), ``benchmark.json`` (every search), ``benchmark_frontier.png``
(test accuracy after the fine-tune vs FLOPs ratio per searcher, the dense model dashed) and
``benchmark_curves.png`` (best search accuracy so far vs evaluations at the main budget).
Everything comes from the records, so a report rebuilt later is the same report.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.bench.latency import LATENCY_REPEATS, LATENCY_TIMING, timed_now
from autoprune.bench.plan import MAIN_BUDGET, Plan
from autoprune.frontier import mean_std
from autoprune.plots import plot_frontier

Row = dict[str, Any]
Record = dict[str, Any]


def _fmt(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    s = mean_std(values)
    if s is None:
        return "-"
    mean, spread, _ = s
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


def cells(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows by (group, searcher), in run order."""
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r["group"], r["searcher"]), []).append(r)
    return out


def _mean(rows: list[Row], key: str) -> tuple[float, float] | None:
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


def model_table(model: str, rows: list[Row], groups: list[str]) -> list[str]:
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
    rows: list[Row],
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
    rows: list[Row], group: str, key: str, agent: str = "ddpg"
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


def verdicts(rows: list[Row], groups: list[str], agent: str = "ddpg") -> list[str]:
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


def revisions_note(done: list[Record]) -> str:
    """' Code: <revision> (groups ...)' per recorded revision; '' for records without one."""
    by: dict[str, list[str]] = {}
    for g in done:
        by.setdefault(g.get("revision") or "not recorded", []).append(g["group"])
    if list(by) == ["not recorded"]:
        return ""
    if len(by) == 1:
        return f" Code: revision {next(iter(by))}."
    return " Code: " + "; ".join(f"{r} ({', '.join(gs)})" for r, gs in by.items()) + "."


def latency_note(done: list[Record]) -> str:
    """How the groups' latencies were timed, naming the groups timed the old ways."""
    old = [g["group"] for g in done if not timed_now(g) and "latency_timing_version" not in g]
    rounds = [g["group"] for g in done if not timed_now(g) and "latency_timing_version" in g]
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


def missing_note(plan: Plan, done: list[Record]) -> list[str]:
    """A paragraph naming the plan's groups not recorded yet (none when the plan is complete)."""
    recorded = {g["group"] for g in done}
    missing = [g.key for g in plan.groups if g.key not in recorded]
    if not missing:
        return []
    return [f"**Partial: {len(recorded)} of {len(plan.groups)} groups recorded.** Not yet run: "
            f"{', '.join(missing)} (`--resume` runs them).", ""]  # fmt: skip


def write_report(
    out: Path, plan: Plan, done: list[Record], command: str, started: str, minutes: float
) -> None:
    """``benchmark.json``, ``benchmark.md`` and the two figures of the recorded groups
    ``done`` (in plan order), made by ``command`` from ``started`` in ``minutes``."""
    rows = [r for g in done for r in g["rows"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    (out / "benchmark.json").write_text(json.dumps(done, indent=1))
    lines = header(plan, done, rows, command, started, minutes)
    lines += summary(plan, done, rows)
    for m in models:
        lines += model_section(m, done, rows)
    (out / "benchmark.md").write_text("\n".join(lines))
    dense_acc = {g["group"].split("/", 1)[0]: g.get("dense_test_accuracy") for g in done}
    plot_report(out, rows, models, plan.main_budget, dense_acc)


def _seeds(rows: list[Row], models: list[str]) -> str:
    """The seeds the recorded rows ran (a report rebuilt later names them, not the plan's)."""
    return "seeds " + ", ".join(
        f"{m} {sorted({r['seed'] for r in rows if r['model'] == m and not r['deterministic']})}"
        for m in models
    )


def header(
    plan: Plan, done: list[Record], rows: list[Row], command: str, started: str, minutes: float
) -> list[str]:
    """The title, what made the report (command, machine, settings) and how to read it."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    data = str((plan.task.get("data") or {}).get("name", "digits"))
    return [
        f"# autoprune benchmark  {started}",
        "",
        f"{command}: {minutes:.1f} min wall (sum over groups) on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {plan.workers} Ray workers; "
        f"{_seeds(rows, models)} ({', '.join(plan.deterministic)}: one run, deterministic); "
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
    ]


def summary(plan: Plan, done: list[Record], rows: list[Row]) -> list[str]:
    """The main tables (test accuracy at the main budget, before and after the fine-tune) and
    the verdicts."""
    groups = [g["group"] for g in done]
    models = list(dict.fromkeys(r["model"] for r in rows))
    searchers = list(dict.fromkeys(r["searcher"] for r in rows))
    main = plan.main_budget
    return [
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


def model_section(model: str, done: list[Record], rows: list[Row]) -> list[str]:
    """A model's dense figures and its table of every group and searcher."""
    first = next(g for g in done if g["group"].startswith(model + "/"))
    dense = f"Dense model: latency {first['dense_latency_ms']:.2f} ms"
    if first.get("dense_test_accuracy") is not None:
        dense += f", test accuracy {100 * first['dense_test_accuracy']:.1f}%"
    groups = [g["group"] for g in done]
    return [f"## {model}", "", dense + ".", "", *model_table(model, rows, groups), ""]


def plot_report(
    out: Path,
    rows: list[Row],
    models: list[str],
    main_budget: str = MAIN_BUDGET,
    dense: dict[str, float | None] | None = None,
) -> None:
    """``benchmark_frontier.png`` and ``benchmark_curves.png``: one panel per model."""
    from matplotlib.figure import Figure

    n = len(models)
    fig = Figure(figsize=(5 * n, 4))
    for i, m in enumerate(models):
        _frontier_panel(fig.add_subplot(1, n, i + 1), m, rows, (dense or {}).get(m))
    fig.tight_layout()
    fig.savefig(out / "benchmark_frontier.png", dpi=90)
    fig = Figure(figsize=(5 * n, 4))
    for i, m in enumerate(models):
        _curves_panel(fig.add_subplot(1, n, i + 1), m, rows, main_budget)
    fig.tight_layout()
    fig.savefig(out / "benchmark_curves.png", dpi=90)


def _frontier_panel(ax: Any, model: str, rows: list[Row], dense: float | None) -> None:
    """Test accuracy (after the fine-tune when there is one) vs FLOPs ratio, the dense dashed."""
    pts = [r for r in rows if r["model"] == model and r["granularity"] == "channel"
           and r["budget"].startswith("flops")]  # fmt: skip
    tuned = any(r.get("test_accuracy_finetuned") is not None for r in pts)
    key = "test_accuracy_finetuned" if tuned else "test_accuracy"
    plot_frontier(pts, key, "flops_ratio", title=model, ax=ax)
    if dense is not None and np.isfinite(dense):
        ax.axhline(100 * dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.legend(fontsize="small")


def _curves_panel(ax: Any, model: str, rows: list[Row], main_budget: str) -> None:
    """Best search accuracy so far vs evaluations at the main budget, mean over seeds."""
    curves: dict[str, list[list[float]]] = {}
    for r in rows:
        if r["group"] == f"{model}/channel/{main_budget}" and r.get("curve"):
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
    ax.set_title(f"{model}, {main_budget}")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best search accuracy so far %")
    if curves:
        ax.legend(fontsize="small")
