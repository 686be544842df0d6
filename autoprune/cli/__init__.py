"""The ``autoprune`` command: a thin layer that parses arguments and calls the library.

This package holds the typer ``app``, its commands registered in the order ``--help`` lists them
(:mod:`~autoprune.cli.task_commands`, :mod:`~autoprune.cli.experiment_commands`,
:mod:`~autoprune.cli.deploy`, :mod:`~autoprune.cli.serve`, :mod:`~autoprune.cli.bench`; tables
and progress bars in :mod:`~autoprune.cli.render`), and
:func:`main`, the console script. Errors are one clear line on stderr and a non-zero exit code;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from autoprune.cli import bench, deploy, experiment_commands, serve, task_commands
from autoprune.cli.render import err

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="autoprune: search per-layer pruning ratios under a FLOPs / params / latency budget.",
)
STATE = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False) -> None:
    STATE["debug"] = debug


for _command in (
    task_commands.units,
    task_commands.evaluate,
    task_commands.sensitivity,
    task_commands.apply,
    deploy.export,
    task_commands.train,
    experiment_commands.search,
    experiment_commands.compare,
    experiment_commands.sweep,
    experiment_commands.best,
    experiment_commands.runs,
    serve.serve,
):
    app.command()(_command)
app.command("bench", epilog=bench.EPILOG)(bench.bench_command)


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
