"""The benchmark's record: ``<out>/benchmark_runs.jsonl``, one JSON line per finished group.

A group is appended as soon as it finishes, so an interrupted benchmark loses at most the group
it was running, and ``--resume`` skips the groups recorded (the last record of a group wins; a
line torn by a kill is skipped with a warning and its group runs again). A run without
``--resume`` starts a new record and keeps the previous one as ``benchmark_runs.<time>.jsonl``.
Each record also names the code revision that measured it (:func:`code_revision`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from autoprune.bench.plan import Plan

RECORDS = "benchmark_runs.jsonl"
OLD_COMMAND = "python experiments/benchmark.py"  # what groups recorded without a command ran

Record = dict[str, Any]


def records_path(out: Path) -> Path:
    return out / RECORDS


def recorded_groups(log: Path, plan: Plan) -> list[Record]:
    """The groups of ``plan`` recorded in ``log`` (the last record of a group wins)."""
    keys = {g.key for g in plan.groups}
    found: dict[str, Record] = {}
    if log.is_file():
        for number, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed while writing: that group runs again
                print(f"warning: {log}:{number} is not a whole record; skipped", file=sys.stderr)
                continue
            if isinstance(record, dict) and record.get("group") in keys:
                found[record["group"]] = record
    return list(found.values())


def append_record(log: Path, record: Record) -> None:
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def set_aside(log: Path) -> Path | None:
    """Keep a previous record as ``benchmark_runs.<its time>.jsonl`` (a new benchmark starts)."""
    if not log.exists():
        return None
    stamp = dt.datetime.fromtimestamp(log.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    kept = log.with_name(f"benchmark_runs.{stamp}.jsonl")
    log.rename(kept)
    return kept


def replace_records(log: Path, records: dict[str, Record]) -> None:
    """Rewrite ``log`` with the last record of each named group replaced (atomically)."""
    lines = log.read_text().splitlines()
    last: dict[str, int] = {}
    for i, line in enumerate(lines):
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("group") in records:
                last[record["group"]] = i
    for key, i in last.items():
        lines[i] = json.dumps(records[key])
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, log)


def in_plan_order(done: list[Record], plan: Plan) -> list[Record]:
    order = [g.key for g in plan.groups]
    return sorted(done, key=lambda g: order.index(g["group"]))


def provenance(done: list[Record], command: str, now: str) -> tuple[str, str, float]:
    """What the report says made it: the groups' commands (`a` + `b`), the earliest start and
    the benchmark's minutes (every group's wall time, across ``--resume``, task builds
    included)."""
    commands = sorted({g.get("command", command) for g in done})
    started = min((g["started"] for g in done if "started" in g), default=now)
    minutes = sum(g["seconds"] for g in done) / 60
    return " + ".join(f"`{c}`" for c in commands), started, minutes


def code_revision(fallback: Path | None = None) -> str | None:
    """The git commit this code runs (``+dirty`` with uncommitted changes to tracked files other
    than results): the package's own checkout, or, for a non-editable install (not in git), the
    checkout of ``fallback`` (the plan's folder); None outside git. Recorded per group: a run
    resumed across sessions can span several revisions."""
    for folder in (Path(__file__).resolve().parent, fallback):
        if folder is not None and (revision := _revision(folder)) is not None:
            return revision
    return None


def _revision(folder: Path) -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             ":(exclude,top)experiments/results"],
            cwd=folder, text=True, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if status.strip() else "")
