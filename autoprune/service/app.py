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

This module holds the FastAPI app (:func:`create_app`: its routes, over :class:`Service`) and
:func:`serve`.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from autoprune.runner.config import ExperimentConfig
from autoprune.service.guard import RequestGuard
from autoprune.service.schemas import (
    Accepted,
    Checkpoint,
    Comparison,
    Health,
    SearchList,
    SearchStatus,
)
from autoprune.service.searches import Service
from autoprune.service.settings import API, Settings, check_bind

_BEARER = HTTPBearer(auto_error=False)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong bearer token"},
    404: {"description": "Unknown id"},
    422: {"description": "Invalid request (the field path is in detail[].loc)"},
}
CONFLICT = {**ERRORS, 409: {"description": "Not possible in the search's current state"}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
}}}  # fmt: skip


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

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=__version__)

    _search_routes(app, service)
    _comparison_routes(app, service)
    _checkpoint_routes(app, service)
    return app


def _search_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(_authorize)]

    @app.post(f"{API}/searches", status_code=202, response_model=Accepted, dependencies=auth,
              responses=ERRORS)  # fmt: skip
    def create_search(body: ExperimentConfig) -> Accepted:
        return service.launch(body, "search")

    @app.get(f"{API}/searches", response_model=SearchList, dependencies=auth, responses=ERRORS)
    def list_searches() -> SearchList:
        return service.list()

    @app.get(f"{API}/searches/{{search_id}}", response_model=SearchStatus, dependencies=auth,
             responses=ERRORS)  # fmt: skip
    async def get_search(search_id: str) -> SearchStatus:
        live = service.live_status(search_id)  # in memory: answered on the event loop
        if live is not None:
            return live
        return await run_in_threadpool(service.status, search_id)

    @app.get(f"{API}/searches/{{search_id}}/policy", response_model=dict[str, Any],
             dependencies=auth, responses=CONFLICT)  # fmt: skip
    def get_policy(search_id: str) -> dict[str, Any]:
        return service.policy(search_id)

    @app.delete(f"{API}/searches/{{search_id}}", response_model=SearchStatus, dependencies=auth,
                responses=CONFLICT)  # fmt: skip
    def cancel_search(search_id: str) -> SearchStatus:
        return service.cancel(search_id)

    @app.post(f"{API}/searches/{{search_id}}/resume", status_code=202, response_model=Accepted,
              dependencies=auth, responses=CONFLICT)  # fmt: skip
    def resume_search(search_id: str) -> Accepted:
        return service.resume(search_id)


def _comparison_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(_authorize)]

    @app.post(f"{API}/comparisons", status_code=202, response_model=Accepted, dependencies=auth,
              responses=ERRORS)  # fmt: skip
    def create_comparison(body: ExperimentConfig) -> Accepted:
        return service.launch(body, "comparison")

    @app.get(f"{API}/comparisons/{{search_id}}", response_model=Comparison, dependencies=auth,
             responses=ERRORS)  # fmt: skip
    def get_comparison(search_id: str) -> Comparison:
        return service.comparison(search_id)


def _checkpoint_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(_authorize)]

    @app.post(f"{API}/checkpoints", status_code=201, response_model=Checkpoint,
              dependencies=auth, responses={**ERRORS, 413: {"description": "Too large"}},
              openapi_extra=UPLOAD_BODY)  # fmt: skip
    async def upload_checkpoint(
        request: Request, model: str = Query(description="Zoo model name, e.g. resnet20")
    ) -> Checkpoint:
        return await service.upload(request, model)


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
