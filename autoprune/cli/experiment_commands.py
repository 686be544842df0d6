"""The commands on experiments: ``search``, ``compare``, ``sweep`` (they run searchers and
record them in MLflow) and ``best``, ``runs`` (they read what was recorded).

Each parses its arguments, calls the library (:mod:`autoprune.runner`, :mod:`autoprune.tracking`)
and prints what it got (:mod:`autoprune.cli.render`). ``best``, ``runs`` and
``compare --recorded`` answer from the tracking store without importing torch or MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from autoprune.cli.options import (
    AddressOpt,
    ApplyEpochsOpt,
    ApplyOpt,
    BudgetOpt,
    ConfigArg,
    EvalsOpt,
    ExperimentOpt,
    OutOpt,
    OverridesArg,
    SearcherOpt,
    SearchersOpt,
    SeedOpt,
    SeedsOpt,
    UriOpt,
    WorkersOpt,
    experiment_cfg,
    names,
    writable,
)
from autoprune.cli.render import (
    bar_hooks,
    comparison_table,
    console,
    err,
    policy_table,
    progress,
    runs_table,
    sweep_table,
    where_to_see,
)
from autoprune.cli.task_commands import apply_and_report

RUNS_NOTE = (
    "policy acc: what `autoprune best` ranks by (the best policy judged like any policy); "
    "search acc: the searcher's own best (NetAdapt's includes fine-tunes). Resume a launch "
    "with --resume <parent run id> (bold rows)."
)


def _run(cfg: Any, resume: str | None = None, evaluations: int | None = None) -> Any:
    """Run an experiment with progress bars; Ctrl-C says how to resume it (exit code 130)."""
    from autoprune.runner.experiment import Interrupted, run_experiment

    with progress() as bar:
        try:
            return run_experiment(cfg, resume=resume, hooks=bar_hooks(bar), evaluations=evaluations)
        except Interrupted as stop:
            err.print(
                "interrupted: every finished evaluation is recorded in MLflow; continue with "
                f"`autoprune search --resume {stop.parent_id}`"
                + (f" --tracking-uri {cfg.tracking.uri}" if cfg.tracking.uri else ""),
                soft_wrap=True,
            )
            raise typer.Exit(130) from None


def _report(result: Any, out: Path, apply_to: Path | None = None, apply_epochs: int = 1) -> None:
    """Best per-unit ratios, where they are saved, the MLflow run, how to look at it; with
    ``apply_to``, the pruned, fine-tuned model and how it compares with the dense one."""
    best = result.best
    title = f"best per-unit ratios: {best.searcher} seed {best.seed}"
    console.print(policy_table(title, best.policy.ratios))
    console.print(f"best policy: {best.policy.save(out)}")
    console.print(f"MLflow run: {result.parent_id} (experiment {result.experiment!r})")
    console.print(where_to_see(result.tracking_uri))
    if apply_to is not None:
        console.print(f"applying the best policy ({best.searcher} seed {best.seed}) ...")
        apply_and_report(result.task, best.policy, apply_to, apply_epochs, policy_path=out)


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
    writable(out, "--out")
    writable(apply_to, "--apply")
    if resume is not None:
        cfg = experiment_cfg(None, None, tracking_uri=tracking_uri)
        result = _run(cfg, resume=resume, evaluations=evaluations)
    else:
        cfg = experiment_cfg(
            config, overrides, [searcher] if searcher else None, budget, evaluations, workers,
            ray_address, tracking_uri, experiment, seed, seeds,
        )  # fmt: skip
        result = _run(cfg)
    if len(result.outcomes) > 1:
        console.print(comparison_table(result.rows(), "searches"))
    _report(result, out, apply_to, apply_epochs)


def compare(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    searchers: SearchersOpt = None,
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
        _compare_recorded(tracking_uri, experiment or "autoprune")
        return
    writable(out, "--out")
    writable(apply_to, "--apply")
    cfg = experiment_cfg(
        config, overrides, names(searchers), budget, evaluations, workers, ray_address,
        tracking_uri, experiment, None, seeds,
    )  # fmt: skip
    result = _run(cfg)
    console.print(comparison_table(result.rows(), f"comparison at {cfg.search.budget}"))
    _report(result, out, apply_to, apply_epochs)


def _compare_recorded(tracking_uri: str | None, experiment: str) -> None:
    from autoprune.tracking.reader import recorded_comparison

    rows = recorded_comparison(tracking_uri, experiment)
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no recorded searches")
    console.print(comparison_table(rows, f"recorded searches of {experiment!r}"))


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
    searchers: SearchersOpt = None,
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
    from autoprune.runner.sweep import (
        log_sweep,
        parse_budgets,
        save_frontier,
        save_rows,
        split_budgets,
    )

    specs = [str(b) for b in parse_budgets(split_budgets(budgets))]  # before any task is built
    cfg = experiment_cfg(
        config, overrides, names(searchers), None, evaluations, workers, ray_address,
        tracking_uri, experiment, None, seeds, finetune_epochs,
    )  # fmt: skip
    result = _run_sweep(cfg, specs)
    console.print(
        sweep_table(result.rows, f"accuracy vs budget ({', '.join(cfg.search.searchers)})")
    )
    figure = save_frontier(result, cfg, plot)
    console.print(f"plot: {plot}")
    if csv is not None:
        console.print(f"table: {save_rows(result, csv)}")
    last = log_sweep(result, figure)
    for spec, res in zip(specs, result.results, strict=True):
        console.print(f"MLflow run at {spec}: {res.parent_id}")
    console.print(
        f"sweep.png and sweep.md/.csv: run {last.parent_id} (experiment {last.experiment!r})"
    )
    console.print(where_to_see(last.tracking_uri))


def _run_sweep(cfg: Any, specs: list[str]) -> Any:
    """Run a sweep with progress bars; Ctrl-C says which budgets are recorded and how to
    continue the interrupted one (exit code 130)."""
    from autoprune.runner.experiment import Interrupted
    from autoprune.runner.sweep import run_sweep

    with progress() as bar:
        hooks = bar_hooks(bar, specs)
        try:
            return run_sweep(cfg, specs, hooks)
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
    from autoprune.tracking.reader import run_reader

    data, run_id = run_reader(tracking_uri).best_policy(experiment, searcher, run)
    policy = Policy.from_dict(data, source=f"run {run_id}")
    if out is not None:
        policy.save(out)
    if as_json:
        print(policy.to_json())
        return
    console.print(policy_table(f"best policy: {policy.searcher} (run {run_id})", policy.ratios))
    acc = policy.metrics.get("accuracy")
    if acc is not None:
        console.print(f"search accuracy {acc:.4f}, budget {policy.budget}")
    if out is not None:
        console.print(f"policy: {out}")


def runs(
    experiment: ExperimentOpt = "autoprune",
    tracking_uri: UriOpt = None,
) -> None:
    """List the runs of an MLflow experiment and their state.

    Example: autoprune runs --experiment autoprune
    """
    from autoprune.tracking.reader import run_reader

    rows = run_reader(tracking_uri).list_runs(experiment or "autoprune")
    console.print(runs_table(rows, experiment))
    console.print(RUNS_NOTE)
