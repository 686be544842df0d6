"""The state and logic behind the service's endpoints: :class:`Service` (the app is a thin
layer over it).

A search is an MLflow parent run (its id is the search id) with one child run per searcher and
seed. Launches of this process are answered from memory (:class:`JobManager`); everything else
is read from MLflow, so a restart loses nothing: launches that were running are reported
``interrupted`` (resumable), queued ones are queued again (:meth:`Service._requeue`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from fastapi import HTTPException, Request

from autoprune.parallel import init_ray
from autoprune.runner.config import ExperimentConfig, experiment_config
from autoprune.service.checkpoints import CheckpointStore
from autoprune.service.jobs import ERROR_TAG, KIND_TAG, LIVE, STATE_TAG, JobManager, requested
from autoprune.service.reaper import reap, record_descendants
from autoprune.service.schemas import (
    Accepted,
    Checkpoint,
    Comparison,
    Progress,
    SearchList,
    SearchStatus,
)
from autoprune.service.settings import Settings
from autoprune.service.validation import validate_request
from autoprune.tracking.store import TrackingError
from autoprune.tracking.writer import Tracker

log = logging.getLogger("autoprune.service")

COMPARISON_METRICS = (
    "best_search_accuracy", "policy_accuracy", "test_accuracy", "best_flops_ratio",
    "best_params_ratio", "evaluations", "search_seconds",
)  # fmt: skip


class Service:
    """State and logic behind the endpoints (the app is a thin layer over it)."""

    def __init__(self, settings: Settings, start_jobs: bool = True) -> None:
        self.settings = settings
        self.checkpoints = CheckpointStore(settings.state_dir / "checkpoints")
        self.tracker = Tracker(settings.tracking_uri, settings.experiment)
        address = settings.ray_address
        if start_jobs:  # one Ray for every launch: local with every core, or the cluster
            address = self._start_ray()
        self.jobs = JobManager(settings, self.tracker, start=start_jobs, ray_address=address)
        self._terminal: dict[str, SearchStatus] = {}
        self._requeue()

    def _start_ray(self) -> str:
        """Ray for the launches (after stopping what a killed predecessor left); its address."""
        import ray

        settings = self.settings
        pids = settings.state_dir / "ray-processes.json"
        for cmd in reap(pids):  # what a killed predecessor left running
            log.warning("stopped a process a previous service left running: %s", cmd[:80])
        cores = os.cpu_count() or 1
        init_ray(max(cores, settings.limits.workers), settings.ray_address)
        address = settings.ray_address or ray.get_runtime_context().gcs_address
        if settings.ray_address is None:  # our own Ray: record it (its agents start late)
            record_descendants(pids)
            timer = threading.Timer(15.0, record_descendants, (pids,))
            timer.daemon = True
            timer.start()
        return str(address)

    # --------------------------------------------------------------- launches
    def validate(self, body: ExperimentConfig, kind: str) -> ExperimentConfig:
        """The service's rules on top of the config schema; 422 with the field path."""
        return validate_request(body, kind, self.settings, self.checkpoints, self.tracker.uri)

    def launch(self, body: ExperimentConfig, kind: str) -> Accepted:
        job = self.jobs.submit(self.validate(body, kind), kind)
        return Accepted(id=job.id, state=job.state)

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

    # --------------------------------------------------------------- status
    def _run(self, search_id: str) -> Any:
        """The MLflow parent run of a search of this service; 404 for any other id."""
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
        done, best, cost = self._recorded_progress(run.info.run_id)
        cfg = experiment_config(self.tracker.config_of(run.info.run_id))
        return SearchStatus(
            id=run.info.run_id, kind=tags.get(KIND_TAG, "search"), state=state,
            progress=Progress(done=done, requested=requested(cfg)), best_accuracy=best,
            cost=cost, mlflow_run_id=run.info.run_id, error=tags.get(ERROR_TAG),
        )  # fmt: skip

    def _recorded_progress(self, run_id: str) -> tuple[int, float | None, dict[str, float] | None]:
        """Evaluations done, the best accuracy within budget and its cost, over the child runs
        (a finished search's summary metrics; an unfinished one's history)."""
        done, best, cost = 0, None, None
        for child in self.tracker.child_runs(run_id):
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
        return done, best, cost

    def list(self) -> SearchList:
        runs = self.tracker._search(
            str(self.tracker.experiment_id),
            "tags.`autoprune.kind` = 'parent'",
            "attributes.start_time DESC",
        )
        ids = [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG)]
        return SearchList(searches=[self.status(i) for i in ids])

    # --------------------------------------------------------------- results
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
                    "status": child["status"], **{k: m.get(k) for k in COMPARISON_METRICS},
                    "run_id": child["run_id"],
                }
            )  # fmt: skip
        return Comparison(id=search_id, state=status.state, rows=rows)

    # --------------------------------------------------------------- checkpoints
    async def upload(self, request: Request, model: str) -> Checkpoint:
        """Check and store uploaded weights for a zoo model (413 over the upload limit)."""
        limit = self.settings.limits.upload_mb * 1024**2
        declared = request.headers.get("content-length")
        return await self.checkpoints.upload(request.stream(), model, limit, declared)
