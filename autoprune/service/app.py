"""The auto-pruning service: an HTTP API to launch searches, follow them and fetch the best ratios.

``autoprune serve`` starts it (uvicorn). A team shares one service: searches run as jobs in the
service process (several at once up to ``max_concurrent``, the rest queued) with their
evaluations on Ray (a local Ray, or the cluster at ``ray_address``), and everything is recorded
in MLflow: a search is an MLflow parent run (its id is the search id) with one child run per
searcher and seed. The service keeps no state of its own besides uploaded checkpoints and the
journal of its running searches, so a restart loses nothing: finished searches are served from
MLflow, searches that were running are reported ``interrupted`` and continue with
``POST /v1/searches/{id}/resume``, queued ones are queued again.

Security: a bearer token (``AUTOPRUNE_TOKEN`` or a token file) is required on every endpoint but
``/health``; without a token the service refuses to bind to anything but loopback. Requests name
zoo models and uploaded checkpoints only: never import strings, server file paths or code.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from autoprune.agents import get_searcher
from autoprune.agents.base import Preflight
from autoprune.budget import Budget
from autoprune.config import ConfigError, DataConfig
from autoprune.runner.experiment import (
    ExperimentConfig,
    _evaluations_for,
    check_options,
    experiment_config,
    seeds_for,
)
from autoprune.service.guard import RequestGuard
from autoprune.service.jobs import ERROR_TAG, KIND_TAG, LIVE, STATE_TAG, JobManager, requested
from autoprune.service.limits import BODY_LIMITS, OPTION_LIMITS, Limits
from autoprune.models import MODELS, build_model, state_dict_mismatch
from autoprune.parallel import init_ray
from autoprune.service.reaper import reap, record_descendants
from autoprune.tracking.tracker import Tracker, TrackingError

API = "/v1"
CHECKPOINT_PREFIX = "ckpt-"
# Searcher options that name a file on the server: never from a request.
FILE_OPTIONS = frozenset({"warm_start", "save_to"})


class ServiceError(RuntimeError):
    """The service cannot start as configured."""


log = logging.getLogger("autoprune.service")


class Settings(BaseModel):
    """How the service runs and what it allows."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token: str | None = None
    tracking_uri: str | None = None
    experiment: str = "service"
    ray_address: str | None = None
    max_concurrent: int = Field(default=2, ge=0, description="Searches running at once.")
    limits: Limits = Field(default_factory=Limits, description="What one request may cost.")
    state_dir: Path = Path(".autoprune") / "service"
    http_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness of the HTTP thread vs the searches."
    )


def load_token(token_file: Path | None = None) -> str | None:
    """The bearer token: ``AUTOPRUNE_TOKEN``, else the first line of ``token_file``."""
    token = os.environ.get("AUTOPRUNE_TOKEN", "").strip()
    if token:
        return token
    if token_file is not None:
        if not token_file.is_file():
            raise ServiceError(f"token file not found: {token_file}")
        lines = token_file.read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ServiceError(f"token file {token_file} is empty")
        return token
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse an unauthenticated service on anything but loopback."""
    if not settings.token and not is_loopback(settings.host):
        raise ServiceError(
            f"refusing to listen on {settings.host} without a token: set AUTOPRUNE_TOKEN or "
            "--token-file (without a token the service binds to loopback only)"
        )


# ------------------------------------------------------------------ API models


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


# ------------------------------------------------------------------ the app


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
    from autoprune.data import load_data
    from autoprune.engine.space import PruningSpace, SpaceError

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


def _unprocessable(loc: list[str | int], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


class Service:
    """State and logic behind the endpoints (the app is a thin layer over it)."""

    def __init__(self, settings: Settings, start_jobs: bool = True) -> None:
        self.settings = settings
        self.checkpoints = settings.state_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(settings.tracking_uri, settings.experiment)
        address = settings.ray_address
        if start_jobs:  # one Ray for every launch: local with every core, or the cluster
            import ray

            pids = settings.state_dir / "ray-processes.json"
            for cmd in reap(pids):  # what a killed predecessor left running
                log.warning("stopped a process a previous service left running: %s", cmd[:80])
            cores = os.cpu_count() or 1
            init_ray(max(cores, settings.limits.workers), settings.ray_address)
            address = address or ray.get_runtime_context().gcs_address
            if settings.ray_address is None:  # our own Ray: record it (its agents start late)
                record_descendants(pids)
                timer = threading.Timer(15.0, record_descendants, (pids,))
                timer.daemon = True
                timer.start()
        self.jobs = JobManager(settings, self.tracker, start=start_jobs, ray_address=address)
        self._terminal: dict[str, SearchStatus] = {}
        self._requeue()

    # --------------------------------------------------------------- requests
    def validate(self, body: ExperimentConfig, kind: str) -> ExperimentConfig:
        """The service's rules on top of the config schema; 422 with the field path."""
        s = self.settings
        if body.model.name not in MODELS:
            raise _unprocessable(
                ["model", "name"], f"choose a zoo model: {sorted(MODELS)} (no import strings)"
            )
        if body.model.kwargs:
            raise _unprocessable(["model", "kwargs"], "model kwargs are not accepted")
        checkpoint = body.model.checkpoint
        if checkpoint is not None:
            meta = self._checkpoint_meta(checkpoint)
            if meta is None:
                raise _unprocessable(
                    ["model", "checkpoint"],
                    "unknown checkpoint id: upload weights with POST /v1/checkpoints (file "
                    "paths are not accepted)",
                )
            if meta["model"] != body.model.name:
                raise _unprocessable(
                    ["model", "checkpoint"],
                    f"checkpoint {checkpoint} is for {meta['model']}, not {body.model.name}",
                )
        if body.data.name != "digits" or body.data.path is not None:
            raise _unprocessable(["data"], "the service serves the digits data only (no paths)")
        if body.search.ray_address is not None:
            raise _unprocessable(["search", "ray_address"], "the service chooses where Ray runs")
        if body.tracking.uri is not None or body.tracking.experiment != "autoprune":
            raise _unprocessable(["tracking"], "the service chooses the tracking store")
        for name, options in body.search.options.items():
            for option in sorted(set(options) & FILE_OPTIONS):
                # A file named by a request would be read (warm_start: unpickled by SB3) or
                # written (save_to) on this machine.
                raise _unprocessable(
                    ["search", "options", name, option], "file paths are not accepted"
                )
        for name, options in body.search.options.items():
            try:
                check_options(name, options)  # the searcher's schema: types and bounds
            except ConfigError as err:
                where, _, msg = str(err).partition(": ")
                loc = [int(p) if p.isdigit() else p for p in where.split(".")]
                raise _unprocessable(loc, msg) from None
        try:
            cfg = experiment_config(body.model_dump())
        except ConfigError as err:  # "search.options.ddpg.x: message" names its field
            where, sep, msg = str(err).partition(": ")
            if sep and where.startswith("search.") and " " not in where:
                loc = [int(p) if p.isdigit() else p for p in where.split(".")]
                raise _unprocessable(loc, msg) from None
            raise _unprocessable(["search"], str(err)) from None
        self._check_limits(cfg)
        if kind == "comparison" and len(set(body.search.searchers)) < 2:
            raise _unprocessable(["search", "searchers"], "a comparison needs two searchers")
        self._check_runnable(cfg)
        data = body.model_dump()
        if checkpoint is not None:
            data["model"]["checkpoint"] = str(self.checkpoints / f"{checkpoint}.pt")
        data["tracking"] = {"uri": self.tracker.uri, "experiment": s.experiment}
        data["search"]["workers"] = max(1, body.search.workers)  # evaluations run on Ray
        # One torch thread per worker: the service's own requests share the cores, and torch's
        # intra-op threads slow down many times over when their cores are busy.
        data["search"]["worker_threads"] = 1
        data["search"]["ray_address"] = s.ray_address
        return experiment_config(data)

    def _check_limits(self, cfg: ExperimentConfig) -> None:
        """Every size a request can set, against the service's limits (``Limits``)."""
        limits = self.settings.limits
        data = cfg.model_dump()

        def check(loc: list[str | int], value: Any, limit: str) -> None:
            bound = getattr(limits, limit)
            if isinstance(value, list):
                if limit == "grid_points":
                    check(loc, len(value), limit)
                    return
                for i, item in enumerate(value):
                    check([*loc, i], item, limit)
            elif isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
                raise _unprocessable(loc, f"at most {bound} (the service's {limit} limit)")

        for path, limit in BODY_LIMITS:
            value: Any = data
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                check(list(path), value, limit)
        for name, options in cfg.search.options.items():
            for key, value in options.items():
                if key in OPTION_LIMITS and value is not None:
                    check(["search", "options", name, key], value, OPTION_LIMITS[key])
        searches = sum(len(seeds_for(cfg.search, n)) for n in cfg.search.searchers)
        if searches > limits.searches:
            raise _unprocessable(["search"], f"at most {limits.searches} searchers x seeds")
        total = requested(cfg)
        if total is not None and total > limits.total_evaluations:
            raise _unprocessable(
                ["search"], f"{total} evaluations in all; at most {limits.total_evaluations}"
            )

    def _check_runnable(self, cfg: ExperimentConfig) -> None:
        """What would only fail after launch, checked before 202: the device, the budget's
        reachability on the model, and each searcher's own :meth:`Searcher.preflight` with what
        the config check could not know (the model's units, this machine's CUDA)."""
        cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise _unprocessable(["device"], "this service has no CUDA device (use cpu or auto)")
        from autoprune.data import DataError
        from autoprune.engine.space import SpaceError

        try:
            units, reachable = _structure(cfg)
        except SpaceError as err:  # a classifier or an ignored layer the model does not have
            raise _unprocessable(_space_error_field(str(err)), str(err)) from None
        except DataError as err:  # e.g. a search split that leaves no training image
            raise _unprocessable(["data"], str(err)) from None
        if not reachable[0]:
            raise _unprocessable(["search", "budget"], reachable[1])
        for name in cfg.search.searchers:
            self._preflight(cfg, name, units, cuda)

    @staticmethod
    def _preflight(cfg: ExperimentConfig, name: str, units: int, cuda: bool) -> None:
        ctx = Preflight(cfg.granularity, _evaluations_for(cfg.search, name), units, cuda)
        problems = get_searcher(name).preflight(cfg.search.options.get(name, {}), ctx)
        if problems:
            where, message = problems[0]
            raise _unprocessable(["search", *where], message)

    def launch(self, body: ExperimentConfig, kind: str) -> Accepted:
        job = self.jobs.submit(self.validate(body, kind), kind)
        return Accepted(id=job.id, state=job.state)

    def _run(self, search_id: str) -> Any:
        try:
            run = self.tracker.get_run(search_id)
        except TrackingError:
            raise HTTPException(404, f"no search {search_id}") from None
        if run.data.tags.get(KIND_TAG) is None or run.info.experiment_id != str(
            self.tracker.experiment_id
        ):
            raise HTTPException(404, f"no search {search_id}")
        return run

    def live_status(self, search_id: str) -> SearchStatus | None:
        """The status of a queued or running launch of this process (no I/O), else None."""
        job = self.jobs.jobs.get(search_id)
        if job is None or job.state not in LIVE:
            return None
        return SearchStatus(
            id=job.id, kind=job.kind, state=job.state,  # type: ignore[arg-type]
            progress=Progress(done=job.done, requested=job.requested),
            best_accuracy=job.best, cost=job.cost, mlflow_run_id=job.id, error=job.error,
        )  # fmt: skip

    def status(self, search_id: str) -> SearchStatus:
        live = self.live_status(search_id)
        if live is not None:
            return live
        if search_id in self._terminal:
            return self._terminal[search_id]
        run = self._run(search_id)
        status = self._recorded_status(run)
        if status.state in ("finished", "failed", "cancelled"):
            self._terminal[search_id] = status
        return status

    def _recorded_status(self, run: Any) -> SearchStatus:
        tags = run.data.tags
        state = tags.get(STATE_TAG, "interrupted")
        job = self.jobs.jobs.get(run.info.run_id)
        if state in LIVE and (job is None or job.state not in LIVE):
            state = "interrupted"
        children = self.tracker.child_runs(run.info.run_id)
        done, best, cost = 0, None, None
        for child in children:
            metrics = child.get("metrics") or {}
            if child["status"] == "FINISHED":
                done += int(metrics.get("evaluations", 0))
                acc = metrics.get("best_search_accuracy")
                if acc is not None and (best is None or acc > best):
                    best = acc
                    cost = {
                        k.removeprefix("best_"): metrics[k]
                        for k in ("best_flops_ratio", "best_params_ratio")
                        if k in metrics
                    }
            else:
                rows = self.tracker.history(child["run_id"])
                done += len(rows)
                for r in rows:
                    if r["meets_budget"] and (best is None or r["accuracy"] > best):
                        best = r["accuracy"]
                        cost = {"flops_ratio": r["flops_ratio"], "params_ratio": r["params_ratio"]}
        cfg = experiment_config(self.tracker.config_of(run.info.run_id))
        return SearchStatus(
            id=run.info.run_id, kind=tags.get(KIND_TAG, "search"), state=state,
            progress=Progress(done=done, requested=requested(cfg)), best_accuracy=best,
            cost=cost, mlflow_run_id=run.info.run_id, error=tags.get(ERROR_TAG),
        )  # fmt: skip

    def list(self) -> SearchList:
        runs = self.tracker._search(
            str(self.tracker.experiment_id),
            "tags.`autoprune.kind` = 'parent'",
            "attributes.start_time DESC",
        )
        ids = [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG)]
        return SearchList(searches=[self.status(i) for i in ids])

    def policy(self, search_id: str) -> dict[str, Any]:
        self._run(search_id)
        children = [c for c in self.tracker.child_runs(search_id) if c["status"] == "FINISHED"]
        if not children:
            raise HTTPException(409, f"search {search_id} has no finished search with a policy yet")

        def rank(child: dict[str, Any]) -> float:
            m = child.get("metrics") or {}
            return float(m.get("policy_accuracy", m.get("best_search_accuracy", -1.0)))

        for child in sorted(children, key=rank, reverse=True):
            try:
                data, _ = self.tracker.best_policy(run_id=child["run_id"])
                return data
            except TrackingError:
                continue  # a search that found nothing within the budget
        raise HTTPException(409, f"search {search_id} found no policy within its budget")

    def comparison(self, search_id: str) -> Comparison:
        status = self.status(search_id)
        if status.kind != "comparison":
            raise HTTPException(404, f"no comparison {search_id} (it is a search)")
        rows = []
        for child in self.tracker.child_runs(search_id):
            m = child.get("metrics") or {}
            rows.append(
                {
                    "searcher": child["searcher"], "seed": child["seed"],
                    "status": child["status"],
                    **{k: m.get(k) for k in (
                        "best_search_accuracy", "policy_accuracy", "test_accuracy",
                        "best_flops_ratio", "best_params_ratio", "evaluations", "search_seconds",
                    )},
                    "run_id": child["run_id"],
                }
            )  # fmt: skip
        return Comparison(id=search_id, state=status.state, rows=rows)

    def cancel(self, search_id: str) -> SearchStatus:
        job = self.jobs.jobs.get(search_id)
        if job is None or job.state not in LIVE:
            self._run(search_id)
            raise HTTPException(409, f"search {search_id} is not queued or running")
        self.jobs.cancel(job)
        deadline = time.monotonic() + 10
        while job.state in LIVE and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.status(search_id)

    def resume(self, search_id: str) -> Accepted:
        status = self.status(search_id)
        if status.state not in ("interrupted", "cancelled", "failed"):
            raise HTTPException(409, f"search {search_id} is {status.state}; nothing to resume")
        cfg = experiment_config(self.tracker.config_of(search_id))
        self._terminal.pop(search_id, None)
        job = self.jobs.resume(search_id, status.kind, cfg)
        return Accepted(id=job.id, state=job.state)

    def _requeue(self) -> None:
        """After a restart: launches that were running are ended ``KILLED`` in MLflow (their
        state stays ``interrupted``, resumable); launches still queued are queued again."""
        running = self.tracker._search(
            str(self.tracker.experiment_id), f"tags.`{STATE_TAG}` = 'running'"
        )
        for run in running:
            self.jobs.close_runs(run.info.run_id, "KILLED")
        runs = self.tracker._search(
            str(self.tracker.experiment_id), f"tags.`{STATE_TAG}` = 'queued'"
        )
        for run in runs:
            cfg = experiment_config(self.tracker.config_of(run.info.run_id))
            self.jobs.resume(run.info.run_id, run.data.tags.get(KIND_TAG, "search"), cfg)

    # --------------------------------------------------------------- checkpoints
    def _checkpoint_meta(self, checkpoint_id: str) -> dict[str, Any] | None:
        if not checkpoint_id.startswith(CHECKPOINT_PREFIX) or not checkpoint_id[5:].isalnum():
            return None
        meta = self.checkpoints / f"{checkpoint_id}.json"
        return json.loads(meta.read_text()) if meta.is_file() else None

    async def upload(self, request: Request, model: str) -> Checkpoint:
        if model not in MODELS:
            raise HTTPException(422, f"unknown zoo model {model!r}; choose from {sorted(MODELS)}")
        limit = self.settings.limits.upload_mb * 1024**2
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"checkpoint larger than {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > limit:
                raise HTTPException(413, f"checkpoint larger than {limit} bytes")
        try:
            obj = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or unsafe content
            raise HTTPException(422, f"not a loadable state dict: {str(exc)[:200]}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise HTTPException(422, "the file is not a state dict (names -> tensors)")
        net = build_model(model, 1, 10)  # the service's data: digits (1 channel, 10 classes)
        problems = state_dict_mismatch(net.state_dict(), obj)
        if problems:
            raise HTTPException(422, f"the weights do not fit {model} on digits: {problems}")
        sha = hashlib.sha256(bytes(data)).hexdigest()
        checkpoint_id = CHECKPOINT_PREFIX + sha[:16]
        (self.checkpoints / f"{checkpoint_id}.pt").write_bytes(bytes(data))
        meta = {"id": checkpoint_id, "model": model, "sha256": sha, "bytes": len(data)}
        meta["created"] = datetime.now(UTC).isoformat()
        (self.checkpoints / f"{checkpoint_id}.json").write_text(json.dumps(meta))
        return Checkpoint(id=checkpoint_id, model=model, sha256=sha, bytes=len(data))


_BEARER = HTTPBearer(auto_error=False)


def _authorize(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    """Every endpoint but /health: the bearer token, when the service has one."""
    token = request.app.state.service.settings.token
    if not token:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        challenge = {"WWW-Authenticate": "Bearer"}
        raise HTTPException(401, "missing or wrong bearer token", challenge)


def create_app(settings: Settings, start_jobs: bool = True) -> FastAPI:
    """The FastAPI app (``start_jobs=False``: searches are accepted and stay queued, for API
    tests that must not run them)."""
    from autoprune._version import __version__

    check_bind(settings)
    service = Service(settings, start_jobs=start_jobs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.jobs.shutdown()

    app = FastAPI(
        title="autoprune",
        version=__version__,
        description="Automatic pruning searches: launch, follow, fetch the best per-layer ratios.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(RequestGuard, settings=settings)
    auth = [Depends(_authorize)]
    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "Missing or wrong bearer token"},
        404: {"description": "Unknown id"},
        422: {"description": "Invalid request (the field path is in detail[].loc)"},
    }

    conflict = {**errors, 409: {"description": "Not possible in the search's current state"}}

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=__version__)

    @app.post(f"{API}/searches", status_code=202, response_model=Accepted, dependencies=auth,
              responses=errors)  # fmt: skip
    def create_search(body: ExperimentConfig) -> Accepted:
        return service.launch(body, "search")

    @app.get(f"{API}/searches", response_model=SearchList, dependencies=auth, responses=errors)
    def list_searches() -> SearchList:
        return service.list()

    @app.get(f"{API}/searches/{{search_id}}", response_model=SearchStatus, dependencies=auth,
             responses=errors)  # fmt: skip
    async def get_search(search_id: str) -> SearchStatus:
        live = service.live_status(search_id)  # in memory: answered on the event loop
        if live is not None:
            return live
        return await run_in_threadpool(service.status, search_id)

    @app.get(f"{API}/searches/{{search_id}}/policy", response_model=dict[str, Any],
             dependencies=auth, responses=conflict)  # fmt: skip
    def get_policy(search_id: str) -> dict[str, Any]:
        return service.policy(search_id)

    @app.delete(f"{API}/searches/{{search_id}}", response_model=SearchStatus, dependencies=auth,
                responses=conflict)  # fmt: skip
    def cancel_search(search_id: str) -> SearchStatus:
        return service.cancel(search_id)

    @app.post(f"{API}/searches/{{search_id}}/resume", status_code=202, response_model=Accepted,
              dependencies=auth, responses=conflict)  # fmt: skip
    def resume_search(search_id: str) -> Accepted:
        return service.resume(search_id)

    @app.post(f"{API}/comparisons", status_code=202, response_model=Accepted, dependencies=auth,
              responses=errors)  # fmt: skip
    def create_comparison(body: ExperimentConfig) -> Accepted:
        return service.launch(body, "comparison")

    @app.get(f"{API}/comparisons/{{search_id}}", response_model=Comparison, dependencies=auth,
             responses=errors)  # fmt: skip
    def get_comparison(search_id: str) -> Comparison:
        return service.comparison(search_id)

    @app.post(f"{API}/checkpoints", status_code=201, response_model=Checkpoint,
              dependencies=auth, responses={**errors, 413: {"description": "Too large"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
              }}})  # fmt: skip
    async def upload_checkpoint(
        request: Request, model: str = Query(description="Zoo model name, e.g. resnet20")
    ) -> Checkpoint:
        return await service.upload(request, model)

    return app


def serve(settings: Settings, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted.

    The thread that serves HTTP runs at a lower CPU priority (``settings.http_nice``, Linux
    per-thread nice) than the threads that drive searches, so heavy polling does not starve
    the searches of the machine's cores.
    """
    import uvicorn

    app = create_app(settings)  # the job threads start here, at the process's priority
    if settings.http_nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):  # not permitted: serve at the same priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), settings.http_nice)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
