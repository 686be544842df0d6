"""``autoprune bench``: the published benchmark from its plan (parsing only; the work is in
:mod:`autoprune.bench`). Nothing heavy is imported until the command runs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # types only: the command imports the library when it runs
    from autoprune.bench.plan import Narrowing, Plan

EPILOG = """Examples:

  autoprune bench experiments/benchmark.yaml --resume           # the whole plan, resumed
  autoprune bench experiments/benchmark.yaml --slice resnet20 flops=0.5   # one group
  autoprune bench experiments/benchmark.yaml --estimate         # its predicted time
"""


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str | None) -> list[int] | None:
    items = _csv(text)
    if not items:
        return None
    try:
        return [int(s) for s in items]
    except ValueError:
        message = f"{text!r}: seeds are integers, e.g. 0,1,2"
        raise typer.BadParameter(message, param_hint="--seeds") from None


def _mode(estimate: bool, report_only: bool, retime_latency: bool) -> str:
    chosen = [name for name, on in (("estimate", estimate), ("report-only", report_only),
                                    ("retime-latency", retime_latency)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise typer.BadParameter(f"choose one of --{', --'.join(chosen)}")
    return chosen[0] if chosen else "run"


def bench_command(
    plan: Annotated[Path, typer.Argument(help="Benchmark plan YAML (experiments/benchmark.yaml).")],
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Measure the plan's unit costs (a few evaluations per model) and print its "
            "predicted time; search and record nothing.",
        ),
    ] = False,
    slice: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--slice",
            metavar="MODEL BUDGET",
            help="Only the plan's group(s) of MODEL at BUDGET, e.g. --slice resnet20 flops=0.5.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip the groups already recorded in --out.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Records and report folder (default: results/ beside the plan)."),
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated subset of the models.")
    ] = None,
    budgets: Annotated[
        str | None, typer.Option(help="Comma-separated, e.g. flops=0.5,flops=0.25.")
    ] = None,
    searchers: Annotated[str | None, typer.Option(help="Comma-separated searchers.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1.")] = None,
    evaluations: Annotated[
        int | None, typer.Option(min=1, help="Evaluations of every searcher, every model.")
    ] = None,
    finetune_epochs: Annotated[int | None, typer.Option(min=0)] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Ray workers (0: in-process).")] = None,
    no_extra: Annotated[
        bool, typer.Option("--no-extra", help="Skip the fine / 2:4 groups.")
    ] = False,
    granularities: Annotated[
        str | None, typer.Option(help="Only groups of these granularities, e.g. fine,nm.")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (the plan's).")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlflow.db here).")
    ] = None,
    stop_after: Annotated[
        float | None,
        typer.Option(
            min=0,
            metavar="MINUTES",
            help="Start no group once this run has lasted MINUTES (go on with --resume).",
        ),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Rebuild the report from --out; run nothing.")
    ] = False,
    retime_latency: Annotated[
        bool,
        typer.Option(
            "--retime-latency",
            help="Time again the latency of recorded groups timed the old ways; search nothing.",
        ),
    ] = False,
) -> None:
    """Run the published benchmark of PLAN: every searcher x seeds per group (model x
    granularity x budget), fine-tuned and timed, recorded group by group in
    OUT/benchmark_runs.jsonl, reported in OUT/benchmark.md."""
    from autoprune.bench.plan import Narrowing, load_plan

    mode = _mode(estimate, report_only, retime_latency)
    narrowing = Narrowing(
        models=_csv(models), budgets=_csv(budgets), searchers=_csv(searchers), seeds=_seeds(seeds),
        evaluations=evaluations, finetune_epochs=finetune_epochs, workers=workers,
        no_extra=no_extra, granularities=_csv(granularities), experiment=experiment,
        slice=(slice[0], slice[1]) if slice else None,
    )  # fmt: skip
    loaded = load_plan(plan, narrowing)
    folder = out if out is not None else plan.parent / "results"
    if mode == "estimate":
        _estimate(loaded, plan, narrowing)
    elif mode == "report-only":
        _report_only(loaded, folder)
    elif mode == "retime-latency":
        _retime(loaded, folder, tracking_uri)
    else:
        flags = [*narrowing.flags(), *(["--out", str(out)] if out is not None else [])]
        command = "autoprune bench " + shlex.join([str(plan), *flags])
        _run(loaded, folder, tracking_uri, resume, stop_after, command)


def _estimate(loaded: Plan, plan: Path, narrowing: Narrowing) -> None:
    from autoprune.bench.estimate import estimate_plan, estimate_report

    command = "autoprune bench " + shlex.join([str(plan), *narrowing.flags(), "--estimate"])
    typer.echo(estimate_report(estimate_plan(loaded), loaded, command))


def _report_only(loaded: Plan, folder: Path) -> None:
    from autoprune.bench.run import report_only

    result = report_only(loaded, folder)
    typer.echo(f"{len(result.done)} of {result.total} groups: {result.report}")


def _retime(loaded: Plan, folder: Path, tracking_uri: str | None) -> None:
    from autoprune.bench.run import retime_latency

    left = retime_latency(loaded, folder, tracking_uri)
    if left:
        raise typer.Exit(1)


def _run(
    loaded: Plan,
    folder: Path,
    tracking_uri: str | None,
    resume: bool,
    stop_after: float | None,
    command: str,
) -> None:
    from autoprune.bench.run import run_benchmark

    result = run_benchmark(loaded, folder, tracking_uri=tracking_uri, resume=resume,
                           stop_after=stop_after, command=command)  # fmt: skip
    typer.echo(f"done in {result.minutes:.1f} min: {result.report}")
    typer.echo(result.report.read_text())
