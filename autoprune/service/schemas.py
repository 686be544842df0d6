"""The service's response bodies (pydantic models); requests are :class:`ExperimentConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class Progress(BaseModel):
    done: int
    requested: int | None


class SearchStatus(BaseModel):
    id: str
    kind: Literal["search", "comparison"]
    state: Literal["queued", "running", "finished", "failed", "cancelled", "interrupted"]
    progress: Progress
    best_accuracy: float | None
    cost: dict[str, float] | None
    mlflow_run_id: str
    error: str | None = None


class SearchList(BaseModel):
    searches: list[SearchStatus]


class Accepted(BaseModel):
    id: str
    state: str


class Comparison(BaseModel):
    id: str
    state: str
    rows: list[dict[str, Any]]


class Checkpoint(BaseModel):
    id: str
    model: str
    sha256: str
    bytes: int


class Health(BaseModel):
    status: str
    version: str
