"""How the CLI shows things: the consoles, rich tables, table cells, number formatting and the
progress bars of a search or sweep. Nothing here computes a result; it only formats one."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

# Piped output (CI logs, `make run | tee`) gets 120 columns instead of rich's 80, so that the
# comparison table is not truncated; a terminal keeps its own width.
_piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
console = Console(width=120) if _piped else Console()
err = Console(stderr=True)


# ------------------------------------------------------------------ cells


def number(value: float) -> str:
    """A count the way people read it: 2.533 M, 632.7 k, 950."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.0f}"


def cell(value: Any, key: str = "") -> str:
    """One table cell: ``-`` for missing, counts as integers, seconds to 0.1, floats to 1e-4."""
    if value is None:
        return "-"
    if key in ("evaluations", "seed"):
        return str(int(value))
    if key == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def mean_cell(values: list[Any], key: str, spread: bool) -> str:
    """The mean of the known values (with ``spread``: ± their sample std); ``-`` for none."""
    import numpy as np

    known = np.array([float(v) for v in values if v is not None])
    if not len(known):
        return "-"
    mean = float(known.mean())
    if key == "evaluations":
        return f"{mean:g}"
    text = f"{mean:.4f}"
    if spread and len(known) > 1:
        text += f" ± {float(np.std(known, ddof=1)):.4f}"
    return text


# ------------------------------------------------------------------ tasks and policies


def units_table(task: Any) -> Table:
    """The units of a task, one row each, as :meth:`PruningSpace.describe` gives them."""
    rows = task.space.describe()
    table = Table(title=f"{task.config.model.name}: {len(rows)} {task.config.granularity} units")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


def ratio_table(title: str, ratios: dict[str, float], task: Any) -> Table:
    """A policy's ratio per unit of ``task``, with each unit's size and what it keeps."""
    table = Table(title=title)
    for col in ("unit", "kind", "size", "ratio", "kept"):
        table.add_column(col, justify="left" if col in ("unit", "kind") else "right")
    for unit in task.space.units:
        r = ratios[unit.name]
        kept = unit.size - round(r * unit.size)
        table.add_row(unit.name, unit.kind, str(unit.size), f"{r:.3f}", str(kept))
    return table


def policy_table(title: str, ratios: dict[str, float]) -> Table:
    """Unit and ratio, one row per unit."""
    table = Table(title=title)
    table.add_column("unit")
    table.add_column("ratio", justify="right")
    for unit, r in ratios.items():
        table.add_row(unit, f"{r:.3f}")
    return table


def evaluation_line(result: Any) -> str:
    """An evaluation's accuracy, loss, cost ratios and time, on one line."""
    return (
        f"search accuracy {result.accuracy:.4f}  loss {result.loss:.4f}  "
        f"FLOPs {result.flops_ratio:.3f}  params {result.params_ratio:.3f}  "
        f"({1e3 * result.seconds['total']:.1f} ms)"
    )


def sensitivity_table(result: Any) -> Table:
    """Search accuracy per unit (rows) and ratio of the grid (columns)."""
    table = Table(title=f"search accuracy (dense {result.dense_accuracy:.4f})")
    table.add_column("unit")
    for r in result.grid:
        table.add_column(f"{r:g}", justify="right")
    for i, unit in enumerate(result.units):
        table.add_row(unit, *(f"{a:.3f}" for a in result.accuracy[i]))
    return table


def product_table(task: Any, result: Any, finetune_epochs: int, steps: int) -> Table:
    """Dense vs pruned (before / after fine-tuning) on the test split: accuracy, loss, MACs,
    params, measured latency."""
    tuned = f"pruned, {finetune_epochs} fine-tune epoch(s)" + (f" x {steps}" if steps > 1 else "")
    table = Table(title=f"the product: dense vs pruned ({task.config.model.name} on "
                        f"{task.data.name}, test split)")  # fmt: skip
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("pruned, no fine-tune", justify="right")
    table.add_column(tuned, justify="right")
    table.add_column("pruned / dense", justify="right")
    names = {"test_accuracy": "test accuracy", "test_loss": "test loss", "macs": "MACs",
             "params": "params",
             "latency_ms": f"latency (ms, batch {result.latency_batch}, 1 thread)"}  # fmt: skip
    for key, label in names.items():
        if key not in result.before:
            continue
        dense, after = result.before[key], result.after[key]
        first = result.pruned_no_finetune.get(key)
        ratio = f"{after / dense:.3f}" if key in ("macs", "params", "latency_ms") else "-"
        digits = 2 if key == "latency_ms" else 4
        show = number if key in ("macs", "params") else (lambda v, d=digits: f"{v:.{d}f}")
        table.add_row(label, show(dense), "-" if first is None else show(first), show(after),
                      ratio)  # fmt: skip
    return table


def runtime_table(rows: list[dict[str, Any]]) -> Table:
    """Dense against pruned latency on each runtime and batch size (one thread)."""
    table = Table(title="latency by runtime: dense vs pruned (ms, 1 thread)")
    for name in ("runtime", "batch", "dense", "pruned", "speedup"):
        table.add_column(name, justify="left" if name == "runtime" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["runtime"], str(r["batch"]), "-", "-", f"not run: {r['error']}")
            continue
        table.add_row(r["runtime"], str(r["batch"]), f"{r['dense_ms']:.2f}",
                      f"{r['pruned_ms']:.2f}", f"{r['speedup']:.2f}x")  # fmt: skip
    return table


def export_table(results: list[Any]) -> Table:
    """Exported files: size, export time and the check against PyTorch."""
    table = Table(title="exported, and checked against the PyTorch model")
    for name in ("format", "file", "MB", "opset", "export s", "max abs error", "max rel error",
                 "checked with", "batches", "inputs"):  # fmt: skip
        table.add_column(name)
    for r in results:
        table.add_row(
            r.format, str(r.path), f"{r.size_bytes / 2**20:.2f}", str(r.opset or "-"),
            f"{r.seconds:.1f}", f"{r.max_abs_error:.2g}", f"{r.max_rel_error:.2g}",
            r.checked_with, ",".join(map(str, r.batch_sizes)), r.inputs,
        )  # fmt: skip
    return table


def budget_lines(result: Any, policy: Any) -> list[str]:
    """The search budget against what was measured on the pruned model, one line per limit."""
    lines = []
    names = {"flops": "FLOPs (MACs)", "params": "params", "latency": "latency"}
    for metric, check in result.budget_check(policy.budget).items():
        if check["measured"] is None:
            continue
        verdict = "met" if check["met"] else "[bold red]NOT met[/]"
        line = (f"budget {names.get(metric, metric)} <= {check['limit']:g}: measured "
                f"{check['measured']:.3f} of the dense model, {verdict}")  # fmt: skip
        predicted = policy.metrics.get(f"{metric}_ratio")
        if metric == "latency" and predicted is not None:
            line += f" (the lookup table predicted {float(predicted):.3f})"
            if not check["met"]:
                line += (
                    "; timings vary with the machine and its load: search again with a margin, "
                    f"e.g. latency={max(check['limit'] - 0.05, check['limit'] / 2):g}"
                )
        lines.append(line)
    return lines


# ------------------------------------------------------------------ experiments


def comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per search (searcher x seed): accuracies before and after fine-tuning, costs."""
    table = Table(title=title)
    columns = [
        ("searcher", "searcher"), ("seed", "seed"), ("status", "status"),
        ("search acc", "best_search_accuracy"), ("policy acc, no FT", "policy_accuracy"),
        ("test acc, no FT", "test_accuracy"), ("test acc, FT", "test_accuracy_finetuned"),
        ("FLOPs", "flops_ratio"), ("params", "params_ratio"),
        ("latency (clock)", "latency_ratio_measured"), ("evals", "evaluations"),
        ("seconds", "seconds"),
    ]  # fmt: skip
    shown = [(h, k) for h, k in columns if any(r.get(k) is not None for r in rows)]
    for header, _ in shown:
        table.add_column(header, justify="left" if header == "searcher" else "right")
    for r in rows:
        table.add_row(*(cell(r.get(k), k) for _, k in shown))
    caption = (
        "no FT: before any fine-tuning (pruned from the dense weights, adaptive BN only), which "
        "is how searches rank policies; FT: after fine-tuning. search acc: the searcher's own "
        "best on the search split (NetAdapt's includes its fine-tunes); policy acc: that policy "
        "judged like any other; test acc: the held-out test split"
    )
    if any(r.get("latency_ratio_measured") is not None for r in rows):
        caption += (
            "; latency (clock): the policy's latency over the dense model's, timed on this "
            "machine after the search (search.latency_check)"
        )
    table.caption = caption
    return table


def sweep_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One line per budget and searcher: means over seeds (accuracies with their std)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["searcher"]), []).append(r)
    columns = [
        ("FLOPs", "flops_ratio", False), ("params", "params_ratio", False),
        ("test acc", "test_accuracy", True), ("test acc (FT)", "test_accuracy_finetuned", True),
        ("policy acc", "policy_accuracy", False), ("evals", "evaluations", False),
    ]  # fmt: skip
    shown = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    if not any("params" in r["budget"] for r in rows):
        shown = [c for c in shown if c[1] != "params_ratio"]
    table = Table(title=title)
    for header in ("budget", "searcher", "seeds"):
        table.add_column(header, justify="right" if header == "seeds" else "left")
    for header, _, _ in shown:
        table.add_column(header, justify="right")
    for (budget, searcher), members in groups.items():
        cells = [budget, searcher, str(len(members))]
        for _, key, spread in shown:
            cells.append(mean_cell([r.get(key) for r in members], key, spread))
        table.add_row(*cells)
    table.caption = (
        "means over seeds (± sample std); FLOPs / params: achieved ratios of the best policies; "
        "test acc: held-out test split, adaptive BN only"
        + (
            "; (FT): after fine-tuning"
            if any(c[1] == "test_accuracy_finetuned" for c in shown)
            else ""
        )
    )
    return table


def runs_table(rows: list[dict[str, Any]], experiment: str | None) -> Table:
    """The runs of an experiment: each launch (bold) followed by its searches."""
    table = Table(title=f"runs of {experiment!r}")
    table.add_column("run id", no_wrap=True, min_width=32)  # whole: copied into best / resume
    table.add_column("name", overflow="fold")
    for col in ("status", "started", "policy acc", "search acc", "evals"):
        table.add_column(
            col, no_wrap=True, justify="left" if col in ("status", "started") else "right"
        )
    for r in grouped(rows):
        child = r.get("kind") != "parent"
        m = r.get("metrics") or {}
        table.add_row(
            r["run_id"], ("  └ " if child else "") + str(r.get("name")), str(r.get("status")),
            str(r.get("start_time") or "-")[5:16].replace("T", " "),
            cell(m.get("policy_accuracy")), cell(r.get("best_search_accuracy")),
            cell(r.get("evaluations"), "evaluations"), style=None if child else "bold",
        )  # fmt: skip
    return table


def grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each launch (parent run) followed by its searches; searches without a listed parent last."""
    parents = [r for r in rows if r.get("kind") == "parent"]
    ids = {r["run_id"] for r in parents}
    out: list[dict[str, Any]] = []
    for parent in parents:
        out.append(parent)
        out.extend(r for r in rows if r.get("parent_id") == parent["run_id"])
    out.extend(r for r in rows if r.get("kind") != "parent" and r.get("parent_id") not in ids)
    return out


def where_to_see(uri: str) -> str:
    """How to look at the runs of a tracking store."""
    if uri.startswith("sqlite:"):
        return f"see the runs: mlflow ui --backend-store-uri {uri}"
    return f"see the runs: {uri}"


# ------------------------------------------------------------------ progress


def progress() -> Progress:
    """A progress display: evaluations done, best accuracy so far, cost, time remaining."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]:.4f}"),
        TextColumn("{task.fields[cost]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def bar_hooks(bar: Progress, budgets: list[str] | None = None) -> Any:
    """Progress bars for an experiment: evaluations, best accuracy so far, cost, ETA. With
    ``budgets`` (a sweep: one experiment per budget, in order) each bar names its budget."""
    from autoprune.runner.experiment import Hooks

    class BarHooks(Hooks):
        def __init__(self, bar: Progress) -> None:
            self.bar = bar
            self.job: Any = None
            self.experiments = 0  # task_ready comes once per experiment

        @property
        def budget(self) -> str | None:
            if not budgets or not self.experiments:
                return None
            return budgets[min(self.experiments, len(budgets)) - 1]

        def task_ready(self, task: Any) -> None:
            self.experiments += 1
            if budgets and self.experiments > 1:
                return  # a sweep builds the same task for every budget
            console.print(
                f"task: {task.config.model.name} on {task.data.name}, {len(task.space)} "
                f"{task.config.granularity} units, criterion {task.config.criterion}"
            )

        def notice(self, text: str) -> None:
            err.print(f"note: {text}", highlight=False)

        def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None:
            label = f"{searcher} seed {seed}" + (f" (resumed at {done})" if done else "")
            if self.budget is not None:
                label = f"{self.budget} {label}"
            self.job = self.bar.add_task(label, total=total, best=0.0, cost="-")

        def evaluation(self, record: Any, result: Any) -> None:
            best = result.best.accuracy if result.best is not None else 0.0
            cost = ", ".join(f"{k} {v:.3f}" for k, v in record.costs().items())
            self.bar.update(self.job, completed=record.index, best=best, cost=cost)

        def search_finished(self, outcome: Any) -> None:
            done = outcome.result.evaluations if outcome.result is not None else None
            self.bar.update(self.job, total=done, completed=done)

    return BarHooks(bar)
