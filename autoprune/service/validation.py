"""What the service checks in a launch request before it answers 202 (a 422 names the field).

On top of the config schema (:class:`ExperimentConfig`): zoo models and uploaded checkpoints
only, the digits data, no file paths, Ray and tracking chosen by the service
(:func:`validate_request`); every size against the service's :class:`Limits`
(:func:`check_limits`); and a preflight against this machine of what would only fail after
launch: the device, the budget's reachability on the model's structure, each searcher's own
:meth:`Searcher.preflight` (:func:`check_runnable`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch
from fastapi.exceptions import RequestValidationError

from autoprune.agents import get_searcher
from autoprune.agents.base import Preflight
from autoprune.budget import Budget
from autoprune.config import ConfigError, DataConfig
from autoprune.models import MODELS, build_model
from autoprune.runner.config import (
    ExperimentConfig,
    check_options,
    evaluations_for,
    experiment_config,
    seeds_for,
)
from autoprune.service.checkpoints import CheckpointStore
from autoprune.service.jobs import requested
from autoprune.service.limits import BODY_LIMITS, OPTION_LIMITS
from autoprune.service.settings import Settings

# Searcher options that name a file on the server: never from a request.
FILE_OPTIONS = frozenset({"warm_start", "save_to"})


def unprocessable(loc: list[str | int], msg: str) -> RequestValidationError:
    """A 422 whose ``detail[].loc`` points at ``loc`` in the request body."""
    return RequestValidationError([{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def validate_request(
    body: ExperimentConfig,
    kind: str,
    settings: Settings,
    checkpoints: CheckpointStore,
    tracking_uri: str,
) -> ExperimentConfig:
    """The service's rules on top of the config schema; 422 with the field path. Returns the
    config the launch runs: the checkpoint's file, the service's tracking store and Ray."""
    _check_sources(body, checkpoints)
    _check_options(body)
    cfg = _config(body)
    check_limits(cfg, settings.limits)
    if kind == "comparison" and len(set(body.search.searchers)) < 2:
        raise unprocessable(["search", "searchers"], "a comparison needs two searchers")
    check_runnable(cfg)
    return _launched(body, settings, checkpoints, tracking_uri)


def _check_sources(body: ExperimentConfig, checkpoints: CheckpointStore) -> None:
    """Zoo models, uploaded checkpoints and digits only; Ray and tracking are the service's."""
    if body.model.name not in MODELS:
        raise unprocessable(
            ["model", "name"], f"choose a zoo model: {sorted(MODELS)} (no import strings)"
        )
    if body.model.kwargs:
        raise unprocessable(["model", "kwargs"], "model kwargs are not accepted")
    if body.model.checkpoint is not None:
        _check_checkpoint(body.model.checkpoint, body.model.name, checkpoints)
    if body.data.name != "digits" or body.data.path is not None:
        raise unprocessable(["data"], "the service serves the digits data only (no paths)")
    if body.search.ray_address is not None:
        raise unprocessable(["search", "ray_address"], "the service chooses where Ray runs")
    if body.tracking.uri is not None or body.tracking.experiment != "autoprune":
        raise unprocessable(["tracking"], "the service chooses the tracking store")


def _check_checkpoint(checkpoint: str, model: str, checkpoints: CheckpointStore) -> None:
    meta = checkpoints.meta(checkpoint)
    if meta is None:
        raise unprocessable(
            ["model", "checkpoint"],
            "unknown checkpoint id: upload weights with POST /v1/checkpoints (file "
            "paths are not accepted)",
        )
    if meta["model"] != model:
        raise unprocessable(
            ["model", "checkpoint"], f"checkpoint {checkpoint} is for {meta['model']}, not {model}"
        )


def _check_options(body: ExperimentConfig) -> None:
    """No searcher option that names a file; each searcher's options against its schema."""
    for name, options in body.search.options.items():
        for option in sorted(set(options) & FILE_OPTIONS):
            # A file named by a request would be read (warm_start: unpickled by SB3) or
            # written (save_to) on this machine.
            raise unprocessable(["search", "options", name, option], "file paths are not accepted")
    for name, options in body.search.options.items():
        try:
            check_options(name, options)  # the searcher's schema: types and bounds
        except ConfigError as err:
            where, _, msg = str(err).partition(": ")
            raise unprocessable(_loc(where), msg) from None


def _loc(where: str) -> list[str | int]:
    """``"search.options.ddpg.net_arch.0"`` as a field path (list indices as ints)."""
    return [int(p) if p.isdigit() else p for p in where.split(".")]


def _config(body: ExperimentConfig) -> ExperimentConfig:
    """The request as a checked experiment config (the runner's own cross-field checks)."""
    try:
        return experiment_config(body.model_dump())
    except ConfigError as err:  # "search.options.ddpg.x: message" names its field
        where, sep, msg = str(err).partition(": ")
        if sep and where.startswith("search.") and " " not in where:
            raise unprocessable(_loc(where), msg) from None
        raise unprocessable(["search"], str(err)) from None


def _launched(
    body: ExperimentConfig, settings: Settings, checkpoints: CheckpointStore, tracking_uri: str
) -> ExperimentConfig:
    """The config a launch runs: what the request chose, in the service's environment."""
    data = body.model_dump()
    if body.model.checkpoint is not None:
        data["model"]["checkpoint"] = str(checkpoints.path(body.model.checkpoint))
    data["tracking"] = {"uri": tracking_uri, "experiment": settings.experiment}
    data["search"]["workers"] = max(1, body.search.workers)  # evaluations run on Ray
    # One torch thread per worker: the service's own requests share the cores, and torch's
    # intra-op threads slow down many times over when their cores are busy.
    data["search"]["worker_threads"] = 1
    data["search"]["ray_address"] = settings.ray_address
    return experiment_config(data)


# ------------------------------------------------------------------ limits


def check_limits(cfg: ExperimentConfig, limits: Any) -> None:
    """Every size a request can set, against the service's limits (``Limits``)."""
    data = cfg.model_dump()
    for path, limit in BODY_LIMITS:
        value: Any = data
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            _check_bound(limits, list(path), value, limit)
    for name, options in cfg.search.options.items():
        for key, value in options.items():
            if key in OPTION_LIMITS and value is not None:
                _check_bound(limits, ["search", "options", name, key], value, OPTION_LIMITS[key])
    searches = sum(len(seeds_for(cfg.search, n)) for n in cfg.search.searchers)
    if searches > limits.searches:
        raise unprocessable(["search"], f"at most {limits.searches} searchers x seeds")
    total = requested(cfg)
    if total is not None and total > limits.total_evaluations:
        raise unprocessable(
            ["search"], f"{total} evaluations in all; at most {limits.total_evaluations}"
        )


def _check_bound(limits: Any, loc: list[str | int], value: Any, limit: str) -> None:
    """One value (or each item of a list; a grid: its length) at most the ``limit`` bound."""
    bound = getattr(limits, limit)
    if isinstance(value, list):
        if limit == "grid_points":
            _check_bound(limits, loc, len(value), limit)
            return
        for i, item in enumerate(value):
            _check_bound(limits, [*loc, i], item, limit)
    elif isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
        raise unprocessable(loc, f"at most {bound} (the service's {limit} limit)")


# ------------------------------------------------------------------ preflight


def check_runnable(cfg: ExperimentConfig) -> None:
    """What would only fail after launch, checked before 202: the device, the budget's
    reachability on the model, and each searcher's own :meth:`Searcher.preflight` with what
    the config check could not know (the model's units, this machine's CUDA)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise unprocessable(["device"], "this service has no CUDA device (use cpu or auto)")
    from autoprune.data import DataError
    from autoprune.engine.units import SpaceError

    try:
        units, reachable = _structure(cfg)
    except SpaceError as err:  # a classifier or an ignored layer the model does not have
        raise unprocessable(_space_error_field(str(err)), str(err)) from None
    except DataError as err:  # e.g. a search split that leaves no training image
        raise unprocessable(["data"], str(err)) from None
    if not reachable[0]:
        raise unprocessable(["search", "budget"], reachable[1])
    for name in cfg.search.searchers:
        _preflight(cfg, name, units, cuda)


def _preflight(cfg: ExperimentConfig, name: str, units: int, cuda: bool) -> None:
    ctx = Preflight(cfg.granularity, evaluations_for(cfg.search, name), units, cuda)
    problems = get_searcher(name).preflight(cfg.search.options.get(name, {}), ctx)
    if problems:
        where, message = problems[0]
        raise unprocessable(["search", *where], message)


def _structure(cfg: ExperimentConfig) -> tuple[int, tuple[bool, str]]:
    """The number of units of the request's model and whether its budget is reachable there
    (FLOPs and params are properties of the structure alone; a latency budget needs the
    measured table and is checked when the search starts)."""
    key = json.dumps(
        [cfg.model.name, cfg.data.model_dump(mode="json"), cfg.granularity, cfg.max_ratio,
         cfg.round_to, cfg.nm.m, cfg.model.classifier, list(cfg.ignore), cfg.ignore_unsupported]
    )  # fmt: skip
    units, space = _space(key)
    budget = Budget.parse(cfg.search.budget)
    metrics = [m for m in budget.metrics if m != "latency"]
    if not metrics:
        return units, (True, "")
    partial = Budget({m: budget.limits[m] for m in metrics})
    try:
        partial.check_reachable(space.cost_ratios, np.full(units, space.max_ratio))
    except ValueError as err:
        return units, (False, str(err))
    return units, (True, "")


def _space_error_field(message: str) -> list[str | int]:
    """Where in the request a pruning-space error points (its message names the option)."""
    if message.startswith("classifier"):
        return ["model", "classifier"]
    if message.startswith("ignore"):
        return ["ignore"]
    return ["model"]


@functools.lru_cache(maxsize=32)
def _space(key: str) -> tuple[int, Any]:
    """The pruning space of a model structure (``key``: its JSON), cached across requests."""
    from autoprune.data import load_data
    from autoprune.engine.space import PruningSpace
    from autoprune.engine.units import SpaceError

    name, data_cfg, granularity, max_ratio, round_to, m, classifier, ignore, skip = json.loads(key)
    data = load_data(DataConfig.model_validate(data_cfg))
    model = build_model(name, data.in_channels, data.num_classes)
    while True:  # the structure alone (the job's task also checks masking equivalence)
        try:
            space = PruningSpace(
                model, data.input_shape, granularity, max_ratio=max_ratio, round_to=round_to,
                nm_m=m, classifier=classifier, ignore=ignore,
            )  # fmt: skip
            return len(space), space
        except SpaceError as err:  # ignore_unsupported: keep the refused units out, as a task
            if not (skip and set(err.units) - set(ignore)):
                raise
            ignore = [*ignore, *(u for u in err.units if u not in ignore)]
