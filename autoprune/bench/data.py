"""The plan's data on this machine: checked before any work, installed where that is possible.

The published plan runs on Fashion-MNIST (IDX files). When they are missing and this is a
Debian machine run as root, ``apt-get install -y dataset-fashion-mnist`` installs them; otherwise
the benchmark stops at once with one line saying what to install or where to put the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from autoprune.bench.plan import Plan
from autoprune.config import DataConfig
from autoprune.data.core import DataError
from autoprune.data.idx import idx_folder

PACKAGE = "dataset-fashion-mnist"


def ensure_data(plan: Plan, install: bool = True) -> str | None:
    """Make sure the plan's IDX data is here before any work; None when it is, else the error.

    When Fashion-MNIST's default folder is missing and this is a Debian machine run as root,
    ``apt-get install -y dataset-fashion-mnist`` installs it (``apt-get update`` first when the
    package is unknown)."""
    data = dict(plan.task.get("data") or {})
    if data.get("name") not in ("fashion_mnist", "mnist"):
        return None
    cfg = DataConfig(**data)
    problem = _missing(cfg)
    if problem is None or not install or cfg.name != "fashion_mnist" or cfg.path is not None:
        return problem
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not root or shutil.which("apt-get") is None:
        return problem + " (run as root on Debian to have it installed, or set data.path)"
    print(f"benchmark: installing {PACKAGE} with apt-get", flush=True)
    failure = _apt_install()
    if failure is not None:
        return f"{problem}; apt-get install {PACKAGE} failed: {failure}"
    return _missing(cfg)


def _missing(cfg: DataConfig) -> str | None:
    """What is missing of the IDX data ``cfg`` names; None when it is all there."""
    try:
        idx_folder(cfg)
        return None
    except DataError as err:
        return str(err)


def _apt_install() -> str | None:
    """Install the package (after ``apt-get update`` when the first try fails); None when it
    worked, else apt-get's last line."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", PACKAGE]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["no output"])[-1]
