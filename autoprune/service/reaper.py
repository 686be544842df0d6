"""Processes a service leaves behind when it is killed, found and stopped on its next start.

A local Ray started by the service (``ray.init(address="local")``) shares the service's fate for
its head processes, but the per-node agents the raylet starts (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) are re-parented to init and live on after a ``SIGKILL`` of the
service. The service records every process below it after Ray starts
(:func:`record_descendants`); the next start stops those still alive (:func:`reap`), matched
by pid *and* start time so that a recycled pid is never touched. Linux only (``/proc``);
elsewhere both are no-ops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command (field 2) is in parentheses and may hold spaces: split after its ")"
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _is_ray(cmd: str) -> bool:
    return cmd.startswith("ray::") or "/ray/" in cmd


def _cmdline(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in (PROC / str(parent) / "task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return sorted(set(out))


def record_descendants(path: Path, pid: int | None = None) -> int:
    """Write the Ray processes below ``pid`` (default: this process, their owner) to ``path``;
    their count."""
    if not PROC.is_dir():
        return 0
    owner = os.getpid() if pid is None else pid
    rows = []
    for child in descendants(owner):
        start, cmd = _start_time(child), _cmdline(child)
        if start is not None and _is_ray(cmd):
            rows.append({"pid": child, "start": start, "cmd": cmd[:200]})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"owner": {"pid": owner, "start": _start_time(owner)},
                               "processes": rows}))  # fmt: skip
    tmp.replace(path)
    return len(rows)


def reap(path: Path) -> list[str]:
    """Stop (SIGKILL) the processes recorded in ``path`` that still run with the same start
    time, unless the service that recorded them is itself still running; the file is then
    removed. Returns the commands of the processes stopped."""
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    owner = record.get("owner") or {}
    try:
        alive = _start_time(int(owner["pid"])) == int(owner["start"])
    except (KeyError, TypeError, ValueError):
        alive = False
    if alive:  # the service that recorded them still runs (a second one on the same state)
        return []
    rows = record.get("processes")
    stopped = []
    for row in rows if isinstance(rows, list) else []:
        try:
            pid, start = int(row["pid"]), int(row["start"])
        except (KeyError, TypeError, ValueError):
            continue
        if pid == os.getpid() or _start_time(pid) != start or not _is_ray(_cmdline(pid)):
            continue  # gone, or its pid now belongs to another process
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            stopped.append(str(row.get("cmd", pid)))
    path.unlink(missing_ok=True)
    return stopped
