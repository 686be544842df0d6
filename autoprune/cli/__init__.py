"""The ``autoprune`` command: a thin layer that parses arguments and calls the library.

Errors are one clear line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from autoprune.service import limits as service_limits

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="autoprune: search per-layer pruning ratios under a FLOPs / params / latency budget.",
)
# Piped output (CI logs, `make run | tee`) gets 120 columns instead of rich's 80, so that the
# comparison table is not truncated; a terminal keeps its own width.
_piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
console = Console(width=120) if _piped else Console()
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
    if task.skipped:
        console.print(f"kept out as unsupported (ignore_unsupported): {', '.join(task.skipped)}")


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
        job = bar.add_task("sensitivity", total=total, best=0.0, cost="")
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
    from autoprune.policy import Policy

    _writable(out, "--out")
    pol = Policy.load(policy)
    task = _task(config, overrides)
    pol.check(task)
    _apply_and_report(task, pol, out, finetune_epochs, steps, lr, policy_path=policy)


def _writable(path: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any search or training starts."""
    if path is None:
        return
    if path.is_dir():
        example = path / "pruned.pt"
        raise ValueError(f"{option} {path} is a folder; give a file path, e.g. {example}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable")


def _number(value: float) -> str:
    """A count the way people read it: 2.533 M, 632.7 k, 950."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.0f}"


def _apply_and_report(
    task: Any,
    policy: Any,
    out: Path,
    finetune_epochs: int,
    steps: int = 1,
    lr: float = 0.01,
    policy_path: Path | None = None,
) -> None:
    """Prune, fine-tune, save; print dense vs pruned (before / after fine-tuning) on the test
    split: accuracy, MACs, params, measured latency; then where the model and policy are."""
    from autoprune.apply import apply_policy, save_pruned

    result = apply_policy(
        task, policy, finetune_epochs=finetune_epochs, steps=steps, lr=lr, progress=console.print
    )
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
        cell = _number if key in ("macs", "params") else (lambda v, d=digits: f"{v:.{d}f}")
        table.add_row(label, cell(dense), "-" if first is None else cell(first), cell(after),
                      ratio)  # fmt: skip
    console.print(table)
    if task.config.granularity != "channel":
        console.print("MACs and params of masked models count only non-zero weights.")
    for line in budget_lines(result, policy):
        console.print(line)
    console.print(f"pruned model: {save_pruned(out, task, result.model, policy)}")
    if policy_path is not None:
        console.print(f"policy: {policy_path}")


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


# ---------------------------------------------------------------- experiments

SearcherOpt = Annotated[str | None, typer.Option(help="Searcher (ddpg, netadapt, random, ...).")]
BudgetOpt = Annotated[str | None, typer.Option(help="Budget, e.g. flops=0.25 or params=0.5.")]
EvalsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Evaluations per search: the budget of ddpg / random (default 300), a limit for "
        "netadapt / sensitivity; uniform and global evaluate one policy.",
    ),
]
WorkersOpt = Annotated[int | None, typer.Option(min=0, help="Ray workers (0: this process).")]
AddressOpt = Annotated[
    str | None, typer.Option(help="Join a Ray cluster: auto, host:port or ray://host:port.")
]
UriOpt = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlflow.db here).")
]
ExperimentOpt = Annotated[str | None, typer.Option(help="MLflow experiment name.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed (one search per seed with --seeds).")]
SeedsOpt = Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")]
OutOpt = Annotated[Path, typer.Option(help="Where to save the best policy (JSON).")]
ApplyOpt = Annotated[
    Path | None,
    typer.Option(
        "--apply",
        help="Then prune with the best policy, fine-tune (--apply-epochs) and save the model here.",
    ),
]
ApplyEpochsOpt = Annotated[int, typer.Option(min=0, help="Fine-tune epochs for --apply.")]


def _experiment_cfg(
    config: str | None,
    overrides: list[str] | None,
    searchers: list[str] | None = None,
    budget: str | None = None,
    evaluations: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    seed: int | None = None,
    seeds: str | None = None,
    finetune_epochs: int | None = None,
) -> Any:
    """The experiment config: YAML + key=value overrides + the command's options (last wins)."""
    from autoprune.runner.experiment import experiment_config

    cfg_path, items = _split(config, overrides)
    flags: dict[str, Any] = {
        "search.searchers": searchers,
        "search.budget": budget,
        "search.evaluations": evaluations,
        "search.workers": workers,
        "search.ray_address": ray_address,
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "search.finetune_epochs": finetune_epochs,
    }
    if seeds is not None:
        try:
            flags["search.seeds"] = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    elif seed is not None:
        flags["search.seeds"] = [seed]
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return experiment_config(cfg_path, [*items, *extra])


def _bar_hooks(bar: Progress, budgets: list[str] | None = None) -> Any:
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


def _run(cfg: Any, resume: str | None = None, evaluations: int | None = None) -> Any:
    from autoprune.runner.experiment import Interrupted, run_experiment

    with _progress() as bar:
        try:
            return run_experiment(
                cfg, resume=resume, hooks=_bar_hooks(bar), evaluations=evaluations
            )
        except Interrupted as stop:
            err.print(
                "interrupted: every finished evaluation is recorded in MLflow; continue with "
                f"`autoprune search --resume {stop.parent_id}`"
                + (f" --tracking-uri {cfg.tracking.uri}" if cfg.tracking.uri else ""),
                soft_wrap=True,
            )
            raise typer.Exit(130) from None


def _comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    columns = [
        ("searcher", "searcher"), ("seed", "seed"), ("status", "status"),
        ("search acc", "best_search_accuracy"), ("policy acc, no FT", "policy_accuracy"),
        ("test acc, no FT", "test_accuracy"), ("test acc, FT", "test_accuracy_finetuned"),
        ("FLOPs", "flops_ratio"), ("params", "params_ratio"),
        ("latency (clock)", "latency_ratio"), ("evals", "evaluations"), ("seconds", "seconds"),
    ]  # fmt: skip
    shown = [(h, k) for h, k in columns if any(r.get(k) is not None for r in rows)]
    for header, _ in shown:
        table.add_column(header, justify="left" if header == "searcher" else "right")
    for r in rows:
        table.add_row(*(_cell(r.get(k), k) for _, k in shown))
    caption = (
        "no FT: before any fine-tuning (pruned from the dense weights, adaptive BN only), which "
        "is how searches rank policies; FT: after fine-tuning. search acc: the searcher's own "
        "best on the search split (NetAdapt's includes its fine-tunes); policy acc: that policy "
        "judged like any other; test acc: the held-out test split"
    )
    if any(r.get("latency_ratio") is not None for r in rows):
        caption += (
            "; latency (clock): the policy's latency over the dense model's, timed on this "
            "machine after the search (search.latency_check)"
        )
    table.caption = caption
    return table


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key in ("evaluations", "seed"):
        return str(int(value))
    if key == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _report(result: Any, out: Path, apply_to: Path | None = None, apply_epochs: int = 1) -> None:
    """Best per-unit ratios, where they are saved, the MLflow run, how to look at it; with
    ``apply_to``, the pruned, fine-tuned model and how it compares with the dense one."""
    best = result.best()
    ratios = best.policy.ratios
    table = Table(title=f"best per-unit ratios: {best.searcher} seed {best.seed}")
    table.add_column("unit")
    table.add_column("ratio", justify="right")
    for unit, r in ratios.items():
        table.add_row(unit, f"{r:.3f}")
    console.print(table)
    console.print(f"best policy: {best.policy.save(out)}")
    console.print(f"MLflow run: {result.parent_id} (experiment {result.experiment!r})")
    uri = result.tracking_uri
    if uri.startswith("sqlite:"):
        console.print(f"see the runs: mlflow ui --backend-store-uri {uri}")
    else:
        console.print(f"see the runs: {uri}")
    if apply_to is not None:
        console.print(f"applying the best policy ({best.searcher} seed {best.seed}) ...")
        _apply_and_report(result.task, best.policy, apply_to, apply_epochs, policy_path=out)


@app.command()
def search(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    searcher: SearcherOpt = None,
    budget: BudgetOpt = None,
    evaluations: EvalsOpt = None,
    workers: WorkersOpt = None,
    ray_address: AddressOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    seed: SeedOpt = None,
    seeds: SeedsOpt = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue an interrupted search (its MLflow run id).")
    ] = None,
    out: OutOpt = Path("best_policy.json"),
    apply_to: ApplyOpt = None,
    apply_epochs: ApplyEpochsOpt = 1,
) -> None:
    """Search per-layer pruning ratios under a budget; record everything in MLflow.

    Examples:
      autoprune search --searcher ddpg --budget flops=0.25 --evaluations 300
      autoprune search experiments/default.yaml --workers 2 --seeds 0,1,2
      autoprune search --resume 3f2a... --evaluations 400
      autoprune search --searcher random --apply pruned.pt --apply-epochs 2
    """
    _writable(out, "--out")
    _writable(apply_to, "--apply")
    if resume is not None:
        cfg = _experiment_cfg(None, None, tracking_uri=tracking_uri)
        result = _run(cfg, resume=resume, evaluations=evaluations)
    else:
        cfg = _experiment_cfg(
            config, overrides, [searcher] if searcher else None, budget, evaluations, workers,
            ray_address, tracking_uri, experiment, seed, seeds,
        )  # fmt: skip
        result = _run(cfg)
    if len(result.outcomes) > 1:
        console.print(_comparison_table(result.rows(), "searches"))
    _report(result, out, apply_to, apply_epochs)


@app.command()
def compare(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    searchers: Annotated[
        str | None, typer.Option(help="Comma-separated, e.g. ddpg,netadapt,uniform,random.")
    ] = None,
    budget: BudgetOpt = None,
    evaluations: EvalsOpt = None,
    workers: WorkersOpt = None,
    ray_address: AddressOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    seeds: SeedsOpt = None,
    recorded: Annotated[
        bool, typer.Option(help="Compare the runs already recorded in --experiment; run nothing.")
    ] = False,
    out: OutOpt = Path("best_policy.json"),
    apply_to: ApplyOpt = None,
    apply_epochs: ApplyEpochsOpt = 1,
) -> None:
    """Run several searchers on the same task and budget and compare them (or, with
    --recorded, compare the runs already in an MLflow experiment).

    Examples:
      autoprune compare experiments/compare.yaml
      autoprune compare --searchers ddpg,netadapt,uniform,random --budget flops=0.5
      autoprune compare --recorded --experiment autoprune
      autoprune compare experiments/compare.yaml --apply pruned.pt --apply-epochs 2
    """
    if recorded:
        from autoprune.tracking.runstore import recorded_comparison

        name = experiment or "autoprune"
        rows = recorded_comparison(tracking_uri, name)
        if not rows:
            raise ValueError(f"experiment {name!r} has no recorded searches")
        console.print(_comparison_table(rows, f"recorded searches of {name!r}"))
        return
    _writable(out, "--out")
    _writable(apply_to, "--apply")
    names = [n for n in searchers.split(",") if n.strip()] if searchers is not None else None
    cfg = _experiment_cfg(
        config, overrides, names, budget, evaluations, workers, ray_address, tracking_uri,
        experiment, None, seeds,
    )  # fmt: skip
    result = _run(cfg)
    console.print(_comparison_table(result.rows(), f"comparison at {cfg.search.budget}"))
    _report(result, out, apply_to, apply_epochs)


@app.command()
def sweep(
    budgets: Annotated[
        str,
        typer.Option(
            help="Comma-separated budgets, e.g. flops=0.75,flops=0.5 or flops=0.75,0.5,0.25 (a "
            "bare number reuses the metric before it); + joins limits: flops=0.5+params=0.6."
        ),
    ],
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    searchers: Annotated[
        str | None, typer.Option(help="Comma-separated, e.g. ddpg,netadapt,uniform,random.")
    ] = None,
    evaluations: EvalsOpt = None,
    workers: WorkersOpt = None,
    ray_address: AddressOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = None,
    seeds: SeedsOpt = None,
    finetune_epochs: Annotated[
        int | None,
        typer.Option(min=0, help="Fine-tune each best policy; the plot then shows that accuracy."),
    ] = None,
    plot: Annotated[Path, typer.Option(help="Write the frontier plot here (PNG).")] = Path(
        "sweep.png"
    ),
    csv: Annotated[Path | None, typer.Option(help="Also write every row here (CSV).")] = None,
) -> None:
    """Accuracy vs budget: run the searchers x seeds at every budget (one MLflow parent run per
    budget), then tabulate and plot test accuracy against the achieved cost ratio.

    The plot (and the table, as sweep.md / sweep.csv) is also logged to the last budget's
    parent run. x: the achieved FLOPs ratio (the params ratio when every budget is params only).

    Examples:
      autoprune sweep --budgets flops=0.75,0.5,0.25 --searchers uniform,random --seeds 0,1
      autoprune sweep experiments/compare.yaml --budgets flops=0.5,0.25,params=0.5 --csv sweep.csv
    """
    from autoprune.runner.experiment import Interrupted
    from autoprune.runner.sweep import parse_budgets, plot_frontier, run_sweep, split_budgets
    from autoprune.tracking.tracker import Tracker

    parsed = parse_budgets(split_budgets(budgets))  # before any task is built
    specs = [str(b) for b in parsed]
    names = [n for n in searchers.split(",") if n.strip()] if searchers is not None else None
    cfg = _experiment_cfg(
        config, overrides, names, None, evaluations, workers, ray_address, tracking_uri,
        experiment, None, seeds, finetune_epochs,
    )  # fmt: skip
    with _progress() as bar:
        hooks = _bar_hooks(bar, specs)
        try:
            result = run_sweep(cfg, specs, hooks)
        except Interrupted as stop:
            index = max(hooks.experiments, 1) - 1
            rest = specs[index + 1 :]
            err.print(
                f"interrupted at budget {specs[index]}: the budgets before it are recorded; "
                f"continue this one with `autoprune search --resume {stop.parent_id}`"
                + (f" --tracking-uri {cfg.tracking.uri}" if cfg.tracking.uri else "")
                + (f"; not started: {' '.join(rest)}" if rest else ""),
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    rows = result.rows
    console.print(_sweep_table(rows, f"accuracy vs budget ({', '.join(cfg.search.searchers)})"))
    accuracy_key = "test_accuracy_finetuned" if cfg.search.finetune_epochs else "test_accuracy"
    only_params = all(b.metrics == ("params",) for b in parsed)
    cost_key = "params_ratio" if only_params else "flops_ratio"
    title = f"{cfg.model.name} on {cfg.data.name}, {cfg.granularity}"
    fig = plot_frontier(rows, accuracy_key, cost_key, title=title)
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    console.print(f"plot: {plot}")
    if csv is not None:
        import pandas as pd

        csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(csv, index=False)
        console.print(f"table: {csv}")
    last = result.results[-1]
    tracker = Tracker(last.tracking_uri, last.experiment)
    tracker.log_figure(last.parent_id, fig, "sweep.png")
    tracker.log_table(last.parent_id, rows, "sweep")
    for spec, res in zip(specs, result.results, strict=True):
        console.print(f"MLflow run at {spec}: {res.parent_id}")
    console.print(
        f"sweep.png and sweep.md/.csv: run {last.parent_id} (experiment {last.experiment!r})"
    )
    uri = last.tracking_uri
    if uri.startswith("sqlite:"):
        console.print(f"see the runs: mlflow ui --backend-store-uri {uri}")
    else:
        console.print(f"see the runs: {uri}")


def _sweep_table(rows: list[dict[str, Any]], title: str) -> Table:
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
            cells.append(_mean_cell([r.get(key) for r in members], key, spread))
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


def _mean_cell(values: list[Any], key: str, spread: bool) -> str:
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


@app.command()
def best(
    experiment: ExperimentOpt = "autoprune",
    searcher: SearcherOpt = None,
    run: Annotated[str | None, typer.Option(help="A search run id (child run).")] = None,
    tracking_uri: UriOpt = None,
    out: Annotated[Path | None, typer.Option(help="Also save the policy here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the policy as JSON.")] = False,
) -> None:
    """The best per-layer ratios recorded in MLflow (any machine that reaches the server).

    Examples:
      autoprune best --experiment autoprune --searcher ddpg --out policy.json
      autoprune best --run 3f2a... --json
    """
    from autoprune.policy import Policy
    from autoprune.tracking.runstore import run_reader

    data, run_id = run_reader(tracking_uri).best_policy(experiment, searcher, run)
    policy = Policy.from_dict(data, source=f"run {run_id}")
    if out is not None:
        policy.save(out)
    if as_json:
        print(policy.to_json())
        return
    table = Table(title=f"best policy: {policy.searcher} (run {run_id})")
    table.add_column("unit")
    table.add_column("ratio", justify="right")
    for unit, r in policy.ratios.items():
        table.add_row(unit, f"{r:.3f}")
    console.print(table)
    acc = policy.metrics.get("accuracy")
    if acc is not None:
        console.print(f"search accuracy {acc:.4f}, budget {policy.budget}")
    if out is not None:
        console.print(f"policy: {out}")


@app.command()
def runs(
    experiment: ExperimentOpt = "autoprune",
    tracking_uri: UriOpt = None,
) -> None:
    """List the runs of an MLflow experiment and their state.

    Example: autoprune runs --experiment autoprune
    """
    from autoprune.tracking.runstore import run_reader

    rows = run_reader(tracking_uri).list_runs(experiment or "autoprune")
    table = Table(title=f"runs of {experiment!r}")
    table.add_column("run id", no_wrap=True, min_width=32)  # whole: copied into best / resume
    table.add_column("name", overflow="fold")
    for col in ("status", "started", "policy acc", "search acc", "evals"):
        table.add_column(
            col, no_wrap=True, justify="left" if col in ("status", "started") else "right"
        )
    for r in _grouped(rows):
        child = r.get("kind") != "parent"
        m = r.get("metrics") or {}
        table.add_row(
            r["run_id"], ("  └ " if child else "") + str(r.get("name")), str(r.get("status")),
            str(r.get("start_time") or "-")[5:16].replace("T", " "),
            _cell(m.get("policy_accuracy")), _cell(r.get("best_search_accuracy")),
            _cell(r.get("evaluations"), "evaluations"), style=None if child else "bold",
        )  # fmt: skip
    console.print(table)
    console.print(
        "policy acc: what `autoprune best` ranks by (the best policy judged like any policy); "
        "search acc: the searcher's own best (NetAdapt's includes fine-tunes). Resume a launch "
        "with --resume <parent run id> (bold rows)."
    )


def _grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each launch (parent run) followed by its searches; searches without a listed parent last."""
    parents = [r for r in rows if r.get("kind") == "parent"]
    ids = {r["run_id"] for r in parents}
    out: list[dict[str, Any]] = []
    for parent in parents:
        out.append(parent)
        out.extend(r for r in rows if r.get("parent_id") == parent["run_id"])
    out.extend(r for r in rows if r.get("kind") != "parent" and r.get("parent_id") not in ids)
    return out


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tracking_uri: UriOpt = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the service.")] = "service",
    ray_address: AddressOpt = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token (or AUTOPRUNE_TOKEN).")
    ] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Searches running at once.")] = 2,
    max_workers: Annotated[int, typer.Option(min=1, help="Ray workers per search.")] = 2,
    max_evaluations: Annotated[int, typer.Option(min=1, help="Evaluations per search.")] = 2000,
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Checkpoint upload limit.")] = 64,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: change one bound on what a request may cost (repeatable). "
            f"Defaults: {service_limits.describe()}.",
            metavar="NAME=VALUE",
        ),
    ] = None,
) -> None:
    """The HTTP service: launch searches, follow them, fetch the best per-layer ratios.

    OpenAPI schema at /openapi.json (docs at /docs). Without a token it binds to loopback only.

    Examples:
      autoprune serve --port 8080
      AUTOPRUNE_TOKEN=... autoprune serve --host 0.0.0.0 --ray-address auto
    """
    from autoprune.service.app import Settings, check_bind, load_token
    from autoprune.service.app import serve as run_service

    try:
        values = service_limits.parse(
            limit or [], workers=max_workers, evaluations=max_evaluations, upload_mb=max_upload_mb
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--limit") from None
    limits = service_limits.Limits(**values)
    settings = Settings(
        host=host, port=port, token=load_token(token_file), tracking_uri=tracking_uri,
        experiment=experiment, ray_address=ray_address, max_concurrent=max_concurrent,
        limits=limits,
    )  # fmt: skip
    check_bind(settings)
    run_service(settings)


def _progress() -> Progress:
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


def main() -> None:
    """Entry point: run the app, turning errors into one line and exit code 2."""
    # MLflow prints a "View run" line to stdout for servers; keep stdout ours (--json).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        # Without standalone mode click returns (not raises) the code of a typer.Exit.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
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
        # One line even when the message has several (YAML parse errors quote the source).
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        err.print(f"error: {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
