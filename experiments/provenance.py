"""Where a measurement came from, for the benchmark scripts' records: the code revision that ran
it (the checkpoint's digest is ``Task.checkpoint_hash``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def code_revision() -> str | None:
    """The git commit the script runs (``+dirty`` with uncommitted changes to tracked files other
    than results); None outside git. Recorded per group or row: a run resumed across sessions
    can span several revisions."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             ":(exclude,top)experiments/results"],
            cwd=HERE, text=True, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if status.strip() else "")
