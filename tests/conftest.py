"""Shared fixtures: one cache folder per checkout, and the default task built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The default checkpoint trains once (about a minute) and is reused by later test runs.
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "autoprune"
os.environ.setdefault("AUTOPRUNE_CACHE", str(CACHE))
# Tiny models: one intra-op thread is as fast as two, and far faster when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_task():
    """ResNet-20 on digits, channel granularity, l2 criterion (the embedded default)."""
    from autoprune import build_task

    return build_task()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session: 4 logical CPUs (an evaluator pool and DDPG's
    environment actors side by side), no dashboard, a small object store."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
