"""The crash journal: every evaluation of a search run appended to a local file as it is recorded.

MLflow receives evaluations in batches; the journal (``.autoprune/journal/<run id>.jsonl``)
gets each one the moment it is recorded, so after a SIGKILL it still has what MLflow had not
yet received, and a resume uploads it (:func:`autoprune.runner.experiment.run_experiment`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoprune.agents.base import Record
from autoprune.interrupts import held

JOURNAL_DIR = Path(".autoprune") / "journal"


class Journal:
    """Append-only local copy of a run's evaluations, written as each one is recorded."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        self.path = (root or Path.cwd()) / JOURNAL_DIR / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @held()
    def append(self, record: Record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record.to_dict()) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out: dict[int, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            out[int(row["index"])] = row
        return [out[i] for i in sorted(out)]
