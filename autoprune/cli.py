"""The ``autoprune`` command: a thin layer that parses arguments and calls the library.

Errors are one clear line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="autoprune: search per-layer pruning ratios under a FLOPs / params / latency budget.",
)
console = Console()
err = Console(stderr=True)
STATE = {"debug": False}

ConfigArg = Annotated[
    str | None, typer.Argument(help="Task config YAML (default: the embedded digits task).")
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. model.name=vgg11.")
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False) -> None:
    STATE["debug"] = debug


def _split(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A first positional that looks like key=value is an override, not a config file."""
    items = list(overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *items]
    return config, items


def _task(config: str | None, overrides: list[str] | None) -> Any:
    from autoprune.task import build_task

    cfg, items = _split(config, overrides)
    with console.status("building the task (the default checkpoint trains on first use)"):
        return build_task(cfg, items)


def _ratio_table(title: str, ratios: dict[str, float], task: Any) -> Table:
    table = Table(title=title)
    for col in ("unit", "kind", "size", "ratio", "kept"):
        table.add_column(col, justify="left" if col in ("unit", "kind") else "right")
    for unit in task.space.units:
        r = ratios[unit.name]
        kept = unit.size - round(r * unit.size)
        table.add_row(unit.name, unit.kind, str(unit.size), f"{r:.3f}", str(kept))
    return table


@app.command()
def units(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """List the units of a task (one decision each) with their geometry and MACs.

    Example: autoprune units model.name=mobilenetv2
    """
    task = _task(config, overrides)
    rows = task.space.describe()
    table = Table(title=f"{task.config.model.name}: {len(rows)} {task.config.granularity} units")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(f"dense MACs {task.space.dense_macs:,.0f}, params {task.space.dense_params:,.0f}")


@app.command()
def evaluate(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    policy: Annotated[Path | None, typer.Option(help="Policy JSON to evaluate.")] = None,
    uniform: Annotated[
        str | None, typer.Option(help="Evaluate the uniform policy meeting this budget.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a policy on the search split (after adaptive BN): accuracy and cost ratios.

    Examples: autoprune evaluate --uniform flops=0.5 ; autoprune evaluate --policy best.json
    """
    import numpy as np

    from autoprune.evaluate import Evaluator
    from autoprune.policy import Policy

    task = _task(config, overrides)
    if policy is not None:
        vec = Policy.load(policy).check(task)
    elif uniform is not None:
        vec = task.project(np.zeros(len(task.space)), task.check_budget(uniform))
    else:
        vec = np.zeros(len(task.space))
    result = Evaluator(task).evaluate(vec)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    console.print(_ratio_table("policy", result.ratios, task))
    console.print(
        f"search accuracy {result.accuracy:.4f}  loss {result.loss:.4f}  "
        f"FLOPs {result.flops_ratio:.3f}  params {result.params_ratio:.3f}  "
        f"({1e3 * result.seconds['total']:.1f} ms)"
    )


@app.command()
def sensitivity(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    grid: Annotated[str, typer.Option(help="Comma-separated ratios.")] = "0.2,0.4,0.6,0.8",
    plot: Annotated[Path | None, typer.Option(help="Write the plot here (PNG).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write the table here (CSV).")] = None,
) -> None:
    """Layer sensitivity scan: prune one unit at a time, the others dense.

    Example: autoprune sensitivity --grid 0.25,0.5,0.75 --plot sens.png
    """
    from autoprune.evaluate import Evaluator
    from autoprune.sensitivity import scan

    try:
        values = [float(g) for g in grid.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"--grid must be comma-separated numbers, got {grid!r}") from None
    task = _task(config, overrides)
    evaluator = Evaluator(task)
    total = len(task.space) * len(values)
    with _progress() as bar:
        job = bar.add_task("sensitivity", total=total)
        result = scan(evaluator, values, callback=lambda *_: bar.advance(job))
    table = Table(title=f"search accuracy (dense {result.dense_accuracy:.4f})")
    table.add_column("unit")
    for r in result.grid:
        table.add_column(f"{r:g}", justify="right")
    for i, unit in enumerate(result.units):
        table.add_row(unit, *(f"{a:.3f}" for a in result.accuracy[i]))
    console.print(table)
    if plot is not None:
        console.print(f"plot: {result.plot(plot)}")
    if csv is not None:
        import pandas as pd

        pd.DataFrame(result.rows()).to_csv(csv, index=False)
        console.print(f"table: {csv}")


@app.command()
def apply(
    policy: Annotated[Path, typer.Option(help="Policy JSON (from a search).")],
    out: Annotated[Path, typer.Option(help="Where to write the pruned model.")],
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="Fine-tune epochs per step.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Iterative prune/fine-tune steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Fine-tune learning rate.")] = 0.01,
) -> None:
    """Prune with a policy, optionally fine-tune (iteratively with --steps), and save the model.

    Example: autoprune apply --policy best.json --finetune-epochs 3 --steps 2 --out pruned.pt
    """
    from autoprune.apply import apply_policy, save_pruned
    from autoprune.policy import Policy

    pol = Policy.load(policy)
    task = _task(config, overrides)
    pol.check(task)
    result = apply_policy(
        task, pol, finetune_epochs=finetune_epochs, steps=steps, lr=lr, progress=console.print
    )
    table = Table(title="test split, before and after")
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    for key in result.before:
        table.add_row(key, f"{result.before[key]:,.4g}", f"{result.after[key]:,.4g}")
    console.print(table)
    if task.config.granularity != "channel":
        console.print("MACs and params of masked models count only non-zero weights.")
    console.print(f"pruned model: {save_pruned(out, task, result.model, pol)}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Where to write the checkpoint (state dict).")],
    config: ConfigArg = None,
    overrides: OverridesArg = None,
) -> None:
    """Train a zoo model's checkpoint on a data set (settings under train.* in the config).

    Example: autoprune train model.name=vgg11 train.epochs=20 --out vgg11.pt
    """
    import torch

    from autoprune.config import task_config
    from autoprune.data import load_data
    from autoprune.models import build_model
    from autoprune.training import train as train_model

    cfg_path, items = _split(config, overrides)
    cfg = task_config(cfg_path, items)
    data = load_data(cfg.data)
    model = build_model(cfg.model.name, data.in_channels, data.num_classes, **cfg.model.kwargs)
    history = train_model(model, data, cfg.train, device=cfg.device, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    console.print(f"test accuracy {history['test_acc']:.4f}; checkpoint: {out}")


@app.command()
def demo(
    budget: Annotated[str, typer.Option(help="Resource budget.")] = "flops=0.5",
    evaluations: Annotated[int, typer.Option(min=1, help="Policies to evaluate.")] = 40,
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="Where to save the best policy.")] = Path(
        "best_policy.json"
    ),
    config: ConfigArg = None,
    overrides: OverridesArg = None,
) -> None:
    """A short default search on the embedded task: uniform vs. random budget-projected policies.

    Example: autoprune demo --budget flops=0.25 --evaluations 60
    """
    from autoprune.demo import quick_search
    from autoprune.policy import Policy

    task = _task(config, overrides)
    spec = task.check_budget(budget)
    with _progress() as bar:
        job = bar.add_task("search", total=evaluations, best=0.0)
        result = quick_search(
            task,
            spec,
            evaluations,
            seed,
            callback=lambda i, _r, best: bar.update(job, completed=i, best=best.accuracy),
        )
    best = result.best
    console.print(_ratio_table(f"best per-unit ratios ({spec})", best.ratios, task))
    console.print(
        f"best search accuracy {best.accuracy:.4f} at FLOPs {best.flops_ratio:.3f}, params "
        f"{best.params_ratio:.3f}; uniform policy {result.uniform.accuracy:.4f}; "
        f"{result.evaluations} evaluations in {result.seconds:.1f} s"
    )
    pol = Policy.from_task(
        task, result.best_ratios, metrics=best.to_dict(), budget=spec.to_dict(), searcher="demo"
    )
    console.print(f"policy: {pol.save(out)}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]:.4f}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def main() -> None:
    """Entry point: run the app, turning errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # one clear line; the traceback only with --debug
        if STATE["debug"]:
            raise
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"error: {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
