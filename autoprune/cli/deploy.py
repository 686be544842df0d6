"""The ``export`` command: a pruned model as users ship it (ONNX, TorchScript, ExportedProgram),
checked in its runtime against PyTorch (:mod:`autoprune.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from autoprune.cli.options import writable
from autoprune.cli.render import console, export_table

FormatOpt = Annotated[str, typer.Option("--format", help="onnx, torchscript or exported_program.")]


def export(
    pruned: Annotated[Path, typer.Argument(help="A pruned model written by apply (--out).")],
    format: FormatOpt = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write it (default: PRUNED with the format's suffix)."),
    ] = None,
    opset: Annotated[int, typer.Option(min=7, help="ONNX opset.")] = 18,
    atol: Annotated[float, typer.Option(min=0, help="Absolute tolerance of the check.")] = 1e-4,
    rtol: Annotated[float, typer.Option(min=0, help="Relative tolerance of the check.")] = 1e-3,
) -> None:
    """Export a pruned model and check the file in its runtime against the PyTorch model
    (max abs and relative error at batch 1 and 8; above the tolerance nothing is written).

    Example: autoprune export pruned.pt --format onnx --out pruned.onnx
    """
    from autoprune.export import check_format, default_path
    from autoprune.export import export as run_export

    check_format(format)
    target = out or default_path(pruned, format)
    writable(target, "--out")
    result = run_export(pruned, target, format, opset=opset, atol=atol, rtol=rtol)
    console.print(export_table([result]))


def export_after_apply(task: Any, model: Any, out: Path, formats: list[str]) -> None:
    """``apply --export``: each format beside the pruned model, checked on a test batch."""
    from autoprune.export import default_path
    from autoprune.export import export as run_export

    x = next(iter(task.data.batches("test", 64)))[0]
    results = [
        run_export(model, default_path(out, f), f, example_input=x, inputs=x) for f in formats
    ]
    console.print(export_table(results))
