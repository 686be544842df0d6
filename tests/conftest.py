"""Shared fixtures: one cache folder per checkout, and the default task built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The default checkpoint trains once (about a minute) and is reused by later test runs.
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "autoprune"
os.environ.setdefault("AUTOPRUNE_CACHE", str(CACHE))


@pytest.fixture(scope="session")
def default_task():
    """ResNet-20 on digits, channel granularity, l2 criterion (the embedded default)."""
    from autoprune import build_task

    return build_task()
