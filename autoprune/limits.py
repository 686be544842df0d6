"""What one request to the service may cost: every size a request can set, bounded.

Light on purpose (pydantic only): ``autoprune serve --help`` lists these limits without importing
torch. ``autoprune serve --limit name=value`` changes one.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _cores() -> int:
    return os.cpu_count() or 1


class Limits(BaseModel):
    """The service's bounds on a request (a 422 names the field that passes one)."""

    model_config = ConfigDict(extra="forbid")

    body_kb: int = Field(default=256, ge=1, description="JSON request body size")
    upload_mb: int = Field(default=64, ge=1, description="checkpoint upload size")
    evaluations: int = Field(default=2000, ge=1, description="evaluations per search")
    total_evaluations: int = Field(
        default=20000, ge=1, description="evaluations of a request, all searchers x seeds"
    )
    searches: int = Field(default=12, ge=1, description="searchers x seeds per request")
    workers: int = Field(default=2, ge=1, description="Ray workers per search")
    threads: int = Field(default_factory=_cores, ge=1, description="torch threads of a search")
    train_epochs: int = Field(default=100, ge=1, description="epochs of a default checkpoint")
    finetune_epochs: int = Field(default=20, ge=0, description="fine-tune epochs of a best policy")
    batch_size: int = Field(default=4096, ge=1, description="any batch size")
    bn_batches: int = Field(default=100, ge=0, description="BN recalibration batches")
    cache_size: int = Field(default=100_000, ge=0, description="evaluations kept in memory")
    network_width: int = Field(default=1024, ge=1, description="ddpg actor/critic layer width")
    buffer_size: int = Field(default=1_000_000, ge=1, description="ddpg replay buffer")
    finetune_batches: int = Field(
        default=1000, ge=0, description="netadapt short-term fine-tune batches"
    )
    long_finetune_batches: int = Field(
        default=20000, ge=0, description="netadapt long-term fine-tune batches"
    )
    population: int = Field(default=1000, ge=2, description="evolution population / parents")
    grid_points: int = Field(default=20, ge=1, description="sensitivity grid ratios")

    def describe(self) -> str:
        """One line per limit: name, value, what it bounds."""
        rows = []
        for name, info in type(self).model_fields.items():
            rows.append(f"{name}={getattr(self, name)} ({info.description})")
        return "; ".join(rows)

    @classmethod
    def parse(cls, items: list[str], **base: Any) -> Limits:
        """``["evaluations=500", ...]`` on top of ``base``; a ValueError names a bad item."""
        values: dict[str, Any] = dict(base)
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in cls.model_fields:
                known = ", ".join(cls.model_fields)
                raise ValueError(f"--limit {item!r}: expected NAME=VALUE with NAME one of {known}")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"--limit {item!r}: the value must be an integer") from None
        return cls(**values)


# Where each limit applies in a request (path into the body; a list applies to every item).
BODY_LIMITS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("train", "epochs"), "train_epochs"),
    (("train", "batch_size"), "batch_size"),
    (("eval", "batch_size"), "batch_size"),
    (("eval", "bn_batch_size"), "batch_size"),
    (("eval", "latency_batch_size"), "batch_size"),
    (("eval", "bn_batches"), "bn_batches"),
    (("eval", "cache_size"), "cache_size"),
    (("threads",), "threads"),
    (("search", "evaluations"), "evaluations"),
    (("search", "workers"), "workers"),
    (("search", "finetune_epochs"), "finetune_epochs"),
)
OPTION_LIMITS: dict[str, str] = {  # search.options.<any searcher>.<option>
    "evaluations": "evaluations",
    "warmup_episodes": "evaluations",
    "batch_size": "batch_size",
    "net_arch": "network_width",
    "buffer_size": "buffer_size",
    "finetune_batches": "finetune_batches",
    "long_finetune_batches": "long_finetune_batches",
    "population": "population",
    "parents": "population",
    "grid": "grid_points",  # the number of grid points
}
