"""Experiment configs: a task config plus what to search (``search``) and where to record it
(``tracking``), validated before anything runs.

:class:`ExperimentConfig` is a :class:`~autoprune.config.TaskConfig` with a ``search`` section
(:class:`SearchConfig`: searchers, budget, evaluations, seeds, workers, per-searcher options)
and a ``tracking`` section (:class:`TrackingConfig`: MLflow URI and experiment name).
:func:`experiment_config` loads one from YAML, a dict or nothing, with ``key=value`` overrides,
checks every searcher's options against its schema (:func:`check_options`) and what would fail
once running (each searcher's preflight). The per-searcher settings (:func:`seeds_for`,
:func:`evaluations_for`, :func:`searcher_options`) say what each searcher of a config gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from autoprune.agents import SEARCHERS, get_searcher
from autoprune.agents.base import Preflight
from autoprune.agents.registry import options_model
from autoprune.budget import Budget
from autoprune.config import ConfigError, TaskConfig, _Strict, validated

DEFAULT_EVALUATIONS = 300  # ddpg / random when search.evaluations is not given
LATENCY_CHECK = 4  # policies timed on the clock after a latency search (search.latency_check)


class SearchConfig(_Strict):
    """What to search: searchers x seeds under one budget."""

    searchers: list[str] = Field(default_factory=lambda: ["ddpg"], min_length=1)
    budget: str = "flops=0.25"
    evaluations: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Evaluations per search: the budget of ddpg / random (default "
            f"{DEFAULT_EVALUATIONS}), a limit for netadapt / sensitivity (default: none); "
            "uniform and global evaluate one policy."
        ),
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    workers: int = Field(default=0, ge=0, description="Ray workers (0: in this process).")
    ray_address: str | None = None
    worker_threads: int | None = Field(
        default=None, ge=1, description="torch threads per Ray worker (None: cores // workers)."
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-searcher options, e.g. {ddpg: {sigma: 0.3}}.",
        json_schema_extra=lambda schema: _options_schema(schema),
    )
    finetune_epochs: int = Field(
        default=0, ge=0, description="Fine-tune each best policy this long for its test accuracy."
    )
    finetune_batches: int | None = Field(
        default=None,
        ge=1,
        description="Cap on that fine-tune's batches (None: the whole finetune_epochs).",
    )
    latency_check: int = Field(
        default=LATENCY_CHECK,
        ge=0,
        description=(
            "Latency budgets are searched against a lookup table: after each search, time its "
            "policy on this machine and, when it misses the limit, prune it further to the "
            "table limit the timing says meets it; at most this many policies timed (0: trust the "
            "table)."
        ),
    )

    @field_validator("searchers")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        out = [n.strip().lower() for n in names]
        for n in out:
            get_searcher(n)  # SearchError (a ValueError) names the known ones
        return out

    @field_validator("budget")
    @classmethod
    def _budget(cls, text: str) -> str:
        return str(Budget.parse(text))


class TrackingConfig(_Strict):
    """Where runs are recorded."""

    uri: str | None = Field(default=None, description="MLflow URI (default ./mlflow.db).")
    experiment: str = "autoprune"
    flush_every: int = Field(default=50, ge=1)
    flush_seconds: float = Field(default=5.0, gt=0)


class ExperimentConfig(TaskConfig):
    """A task config plus ``search`` and ``tracking``."""

    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def task(self) -> TaskConfig:
        return TaskConfig.model_validate(self.model_dump(exclude={"search", "tracking"}))


def _options_schema(schema: dict[str, Any]) -> None:
    """The JSON schema of ``search.options``: one typed object per searcher (its options with
    their bounds, ``options_model``), no other keys."""
    schema.pop("additionalProperties", None)
    schema["properties"] = {
        name: {k: v for k, v in options_model(name).model_json_schema().items() if k != "title"}
        for name in sorted(SEARCHERS)
    }
    schema["additionalProperties"] = False


def check_options(name: str, options: Any) -> dict[str, Any]:
    """``search.options.<name>`` checked against the searcher's schema (types and bounds):
    the validated options, or a :class:`ConfigError` naming the field."""
    if name not in SEARCHERS:
        raise ConfigError(
            f"search.options: unknown searcher {name!r}; choose from {sorted(SEARCHERS)}"
        )
    if not isinstance(options, dict):
        raise ConfigError(f"search.options.{name} must be a mapping of option names to values")
    try:
        checked = options_model(name).model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        known = sorted(get_searcher(name).options_type.model_fields)
        hint = f"; known: {known}" if first["type"] == "extra_forbidden" else ""
        raise ConfigError(f"search.options.{name}.{where}: {first['msg']}{hint}") from None
    return checked.model_dump(exclude_unset=True)


def experiment_config(
    source: ExperimentConfig | dict[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """Validated experiment config from a YAML path, a dict, a config or nothing (defaults)."""
    cfg = validated(ExperimentConfig, source, overrides)
    options = {name: check_options(name, o) for name, o in cfg.search.options.items()}
    cfg.search.options = options
    for name in options:
        seeds_for(cfg.search, name)
    for name in cfg.search.searchers:  # what would fail once running, found from the options
        ctx = Preflight(cfg.granularity, evaluations_for(cfg.search, name))
        for where, message in get_searcher(name).preflight(options.get(name, {}), ctx)[:1]:
            raise ConfigError(f"search.{'.'.join(where)}: {message}")
    return cfg


PER_SEARCHER = ("evaluations", "seeds")
"""Keys of ``search.options.<searcher>`` that override the search section for that searcher only
(e.g. ``uniform: {seeds: [0]}``: a deterministic searcher gives the same result for every seed)."""


def seeds_for(cfg: SearchConfig, name: str) -> list[int]:
    """The seeds a searcher runs: its own ``seeds`` option, else ``search.seeds``."""
    seeds = cfg.options.get(name, {}).get("seeds")
    if seeds is None:
        return list(cfg.seeds)
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"search.options.{name}.seeds must be a non-empty list of integers")
    return [int(s) for s in seeds]


def searcher_options(cfg: SearchConfig, name: str) -> dict[str, Any]:
    """A searcher's own options: ``search.options.<name>`` less the per-searcher overrides."""
    return {k: v for k, v in cfg.options.get(name, {}).items() if k not in PER_SEARCHER}


def evaluations_for(cfg: SearchConfig, name: str) -> int | None:
    """The evaluation budget a searcher gets: its own option, else ``search.evaluations`` for
    every searcher that can use one (a budget for ddpg / random, a limit for netadapt /
    sensitivity), else the default budget of the searchers that need one."""
    options = cfg.options.get(name, {})
    if "evaluations" in options:
        return int(options["evaluations"])
    searcher = get_searcher(name)
    if searcher.fixed_evaluations is not None:
        return None
    if cfg.evaluations is not None:
        return cfg.evaluations
    return DEFAULT_EVALUATIONS if searcher.needs_evaluations else None


def evaluation_notices(cfg: SearchConfig) -> list[str]:
    """What ``search.evaluations`` does not change, said rather than silently ignored."""
    if cfg.evaluations is None:
        return []
    out = []
    for name in cfg.searchers:
        fixed = get_searcher(name).fixed_evaluations
        if fixed is not None and "evaluations" not in cfg.options.get(name, {}):
            out.append(
                f"{name} evaluates {fixed} polic{'y' if fixed == 1 else 'ies'}: "
                f"evaluations={cfg.evaluations} does not apply to it"
            )
    return out
