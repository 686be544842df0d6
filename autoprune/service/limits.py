"""What one request to the service may cost: every size a request can set, bounded.

Light on purpose (pydantic only): ``autoprune serve --help`` lists these limits without importing
torch. ``autoprune serve --limit name=value`` changes one.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any


def _cores() -> int:
    return os.cpu_count() or 1


# name: (default, smallest allowed value, what it bounds); a callable default is computed.
TABLE: dict[str, tuple[Any, int, str]] = {
    "body_kb": (256, 1, "JSON request body size"),
    "upload_mb": (64, 1, "checkpoint upload size"),
    "evaluations": (2000, 1, "evaluations per search"),
    "total_evaluations": (20000, 1, "evaluations of a request, all searchers x seeds"),
    "searches": (12, 1, "searchers x seeds per request"),
    "workers": (2, 1, "Ray workers per search"),
    "threads": (_cores, 1, "torch threads of a search"),
    "train_epochs": (100, 1, "epochs of a default checkpoint"),
    "finetune_epochs": (20, 0, "fine-tune epochs of a best policy"),
    "batch_size": (4096, 1, "any batch size"),
    "bn_batches": (100, 0, "BN recalibration batches"),
    "cache_size": (100_000, 0, "evaluations kept in memory"),
    "network_width": (1024, 1, "ddpg actor/critic layer width"),
    "buffer_size": (1_000_000, 1, "ddpg replay buffer"),
    "finetune_batches": (1000, 0, "netadapt short-term fine-tune batches"),
    "long_finetune_batches": (20000, 0, "netadapt long-term fine-tune batches"),
    "population": (1000, 2, "evolution population / parents"),
    "grid_points": (20, 1, "sensitivity grid ratios"),
}


def default(name: str) -> int:
    value = TABLE[name][0]
    return int(value() if callable(value) else value)


def describe() -> str:
    """One entry per limit: name=default (what it bounds)."""
    return "; ".join(f"{name}={default(name)} ({row[2]})" for name, row in TABLE.items())


def parse(items: list[str], **base: int) -> dict[str, int]:
    """``["evaluations=500", ...]`` on top of ``base``: the values to give :class:`Limits`; a
    ValueError names a bad item."""
    values = dict(base)
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in TABLE:
            known = ", ".join(TABLE)
            raise ValueError(f"--limit {item!r}: expected NAME=VALUE with NAME one of {known}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ValueError(f"--limit {item!r}: the value must be an integer") from None
        if values[name] < TABLE[name][1]:
            raise ValueError(f"--limit {item!r}: {name} must be at least {TABLE[name][1]}")
    return values


@cache
def _model() -> Any:
    from pydantic import BaseModel, ConfigDict, Field, create_model

    class _Base(BaseModel):
        """The service's bounds on a request (a 422 names the field that passes one)."""

        model_config = ConfigDict(extra="forbid")

        def describe(self) -> str:
            return "; ".join(f"{n}={getattr(self, n)} ({TABLE[n][2]})" for n in TABLE)

    fields: dict[str, Any] = {}
    for name, (value, low, text) in TABLE.items():
        dflt = {"default_factory": value} if callable(value) else {"default": value}
        fields[name] = (int, Field(ge=low, description=text, **dflt))
    return create_model("Limits", __base__=_Base, **fields)


def __getattr__(name: str) -> Any:
    """``Limits``, the pydantic model of :data:`TABLE`, built on first use (the CLI's help
    lists the limits without importing pydantic)."""
    if name == "Limits":
        return _model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
