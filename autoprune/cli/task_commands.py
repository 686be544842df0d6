"""The commands on one task: ``units``, ``evaluate``, ``sensitivity``, ``apply``, ``train``.

Each parses its arguments, calls the library and prints what it got (:mod:`autoprune.cli.render`);
heavy libraries are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from autoprune.cli.options import ConfigArg, OverridesArg, split_config, writable
from autoprune.cli.render import (
    budget_lines,
    console,
    evaluation_line,
    product_table,
    progress,
    ratio_table,
    runtime_table,
    sensitivity_table,
    units_table,
)


def load_task(config: str | None, overrides: list[str] | None) -> Any:
    """The task of a config file and overrides, with a status line while it is built."""
    from autoprune.task import build_task

    cfg, items = split_config(config, overrides)
    with console.status("building the task (the default checkpoint trains on first use)"):
        return build_task(cfg, items)


def units(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """List the units of a task (one decision each) with their geometry and MACs.

    Example: autoprune units model.name=mobilenetv2
    """
    task = load_task(config, overrides)
    console.print(units_table(task))
    console.print(f"dense MACs {task.space.dense_macs:,.0f}, params {task.space.dense_params:,.0f}")
    if task.skipped:
        console.print(f"kept out as unsupported (ignore_unsupported): {', '.join(task.skipped)}")


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

    task = load_task(config, overrides)
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
    console.print(ratio_table("policy", result.ratios, task))
    console.print(evaluation_line(result))


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
    task = load_task(config, overrides)
    evaluator = Evaluator(task)
    total = len(task.space) * len(values)
    with progress() as bar:
        job = bar.add_task("sensitivity", total=total, best=0.0, cost="")
        result = scan(evaluator, values, callback=lambda *_: bar.advance(job))
    console.print(sensitivity_table(result))
    if plot is not None:
        console.print(f"plot: {result.plot(plot)}")
    if csv is not None:
        console.print(f"table: {result.save_csv(csv)}")


def apply(
    policy: Annotated[Path, typer.Option(help="Policy JSON (from a search).")],
    out: Annotated[Path, typer.Option(help="Where to write the pruned model.")],
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="Fine-tune epochs per step.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Iterative prune/fine-tune steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Fine-tune learning rate.")] = 0.01,
    export: Annotated[
        list[str] | None,
        typer.Option(help="Also export: onnx, torchscript, exported_program (repeatable)."),
    ] = None,
) -> None:
    """Prune with a policy, optionally fine-tune (iteratively with --steps), and save the model
    (with --export also as ONNX / TorchScript / ExportedProgram, checked against PyTorch).

    Example: autoprune apply --policy best.json --finetune-epochs 3 --out pruned.pt --export onnx
    """
    from autoprune.export import check_format
    from autoprune.policy import Policy

    for fmt in export or []:
        check_format(fmt)
    writable(out, "--out")
    pol = Policy.load(policy)
    task = load_task(config, overrides)
    pol.check(task)
    apply_and_report(task, pol, out, finetune_epochs, steps, lr, policy_path=policy, export=export)


def apply_and_report(
    task: Any,
    policy: Any,
    out: Path,
    finetune_epochs: int,
    steps: int = 1,
    lr: float = 0.01,
    policy_path: Path | None = None,
    export: list[str] | None = None,
) -> None:
    """Prune, fine-tune, save; print dense vs pruned (before / after fine-tuning) on the test
    split: accuracy, MACs, params, measured latency; then where the model and policy are."""
    from autoprune.apply import apply_policy, save_pruned
    from autoprune.costs.runtimes import RUNTIMES

    result = apply_policy(
        task, policy, finetune_epochs=finetune_epochs, steps=steps, lr=lr,
        progress=console.print, runtimes=RUNTIMES,
    )  # fmt: skip
    console.print(product_table(task, result, finetune_epochs, steps))
    console.print(runtime_table(result.runtimes))
    macs = result.after["macs"] / result.before["macs"]
    console.print(f"MACs ratio {macs:.3f}: the speedup a runtime gives differs from 1 / {macs:.3f}")
    if task.config.granularity != "channel":
        console.print("MACs and params of masked models count only non-zero weights.")
    for line in budget_lines(result, policy):
        console.print(line)
    console.print(f"pruned model: {save_pruned(out, task, result.model, policy)}")
    if export:
        from autoprune.cli.deploy import export_after_apply

        export_after_apply(task, result.model, out, export)
    if policy_path is not None:
        console.print(f"policy: {policy_path}")


def train(
    out: Annotated[Path, typer.Option(help="Where to write the checkpoint (state dict).")],
    config: ConfigArg = None,
    overrides: OverridesArg = None,
) -> None:
    """Train a zoo model's checkpoint on a data set (settings under train.* in the config).

    Example: autoprune train model.name=vgg11 train.epochs=20 --out vgg11.pt
    """
    from autoprune.config import task_config
    from autoprune.training import train_checkpoint

    cfg_path, items = split_config(config, overrides)
    history = train_checkpoint(task_config(cfg_path, items), out, progress=True)
    console.print(f"test accuracy {history['test_acc']:.4f}; checkpoint: {out}")
