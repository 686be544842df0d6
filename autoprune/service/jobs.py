"""The service's launches: a queue of jobs, each run in its own process, their state kept in
MLflow tags (so a restart loses nothing), and the MLflow runs of a stopped launch ended."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from autoprune.agents import get_searcher
from autoprune.runner.config import ExperimentConfig, evaluations_for, seeds_for
from autoprune.runner.experiment import Hooks, _recover, run_experiment
from autoprune.runner.journal import Journal
from autoprune.service.settings import Settings
from autoprune.tracking.writer import Tracker

KIND_TAG = "autoprune.service.kind"  # search | comparison
STATE_TAG = "autoprune.service.state"  # queued | running | finished | failed | cancelled
ERROR_TAG = "autoprune.service.error"
LIVE = ("queued", "running")


@dataclass
class Job:
    id: str
    kind: str
    config: ExperimentConfig
    state: str = "queued"
    done: int = 0
    best: float | None = None
    cost: dict[str, float] | None = None
    error: str | None = None
    stop: str | None = None  # "cancel" | "shutdown"
    requested: int | None = None


def requested(cfg: ExperimentConfig) -> int | None:
    """Evaluations a launch asks for, when every searcher has a fixed count."""
    total = 0
    for name in cfg.search.searchers:
        options = cfg.search.options.get(name, {})
        fixed = get_searcher(name).fixed_evaluations
        limit = evaluations_for(cfg.search, name)
        if fixed is not None and "evaluations" not in options:
            n = fixed
        elif limit is not None:
            n = limit
        else:
            return None
        total += n * len(seeds_for(cfg.search, name))
    return total


class _PipeHooks(Hooks):
    """Progress of a launch, sent from its process to the service over a pipe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.parent = os.getppid()
        self.base = self.done = 0
        self.best: float | None = None
        self.cost: dict[str, float] | None = None

    def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None:
        self.base = self.done - done  # evaluations of earlier searches of this launch

    def evaluation(self, record: Any, result: Any) -> None:
        if os.getppid() != self.parent:  # the service died: stop (resume continues it)
            raise KeyboardInterrupt
        self.done = self.base + record.index
        if result.best is not None and (self.best is None or result.best.accuracy > self.best):
            self.best, self.cost = result.best.accuracy, result.best.costs()
        self.conn.send(("progress", self.done, self.best, self.cost))


_STOPS: list[tuple[int, float]] = []  # the signals that asked this launch to stop, and when
REPEAT_GRACE_S = 20.0  # a repeated stop inside this time is the same stop: the unwind goes on


def _stop(signum: int, exc: BaseException) -> None:
    """Raise ``exc`` for the first stop signal. A stopping service sends SIGINT to its launch,
    which often has the process group's SIGTERM already: raising again would cut short the
    unwind that records the search (a second exception inside the first one's handler). A
    signal that comes later than the grace stops a launch whose unwind hangs."""
    now = time.monotonic()
    repeat = bool(_STOPS) and now - _STOPS[0][1] < REPEAT_GRACE_S
    _STOPS.append((signum, now))
    if not repeat:
        raise exc


def _interrupt(signum: int, _frame: Any) -> None:
    _stop(signum, KeyboardInterrupt())


def _terminate(signum: int, _frame: Any) -> None:
    _stop(signum, SystemExit(143))


def _job_process(config: dict[str, Any], run_id: str, conn: Any) -> None:
    """One launch in its own process (its own interpreter, so the service's HTTP work and the
    search never wait on each other's GIL); SIGINT stops it the way Ctrl-C stops the CLI."""
    # A service started as a background job (nohup, &) passes SIGINT on ignored; cancel needs it.
    signal.signal(signal.SIGINT, _interrupt)
    # SIGTERM (the service's process group stopped) unwinds like a shutdown, so the tracker
    # flushes what was recorded; not only when Ray happens to have installed its own handler.
    signal.signal(signal.SIGTERM, _terminate)
    torch.set_num_threads(1)
    outcome: tuple[str, str | None] = ("finished", None)
    try:
        run_experiment(
            ExperimentConfig.model_validate(config), resume=run_id, hooks=_PipeHooks(conn)
        )
    except (KeyboardInterrupt, SystemExit):  # cancel, shutdown, or SIGTERM (Ray's handler)
        outcome = ("stopped", None)
    except Exception as exc:  # reported to the service, which marks the launch failed
        if _STOPS:  # asked to stop, and the unwind broke something (a Ray worker stopped with
            traceback.print_exc()  # the same process group): still a stop; the log says what
            outcome = ("stopped", None)
        else:
            outcome = ("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    with contextlib.suppress(OSError):  # the service gone: it reads the exit as it can
        conn.send(outcome)


class JobManager:
    """Runs launches in ``max_concurrent`` threads; their state lives in MLflow tags."""

    def __init__(
        self,
        settings: Settings,
        tracker: Tracker,
        start: bool = True,
        ray_address: str | None = None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        self.ray_address = ray_address  # where launch processes find Ray
        self.closing = False
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[tuple[Job, bool] | None] = queue.Queue()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"autoprune-job-{i}")
            for i in range(settings.max_concurrent if start else 0)
        ]
        for t in self.threads:
            t.start()

    # --------------------------------------------------------------- launches
    def submit(self, cfg: ExperimentConfig, kind: str) -> Job:
        tags = {KIND_TAG: kind, STATE_TAG: "queued"}
        name = f"{kind}: {'+'.join(cfg.search.searchers)} {cfg.search.budget}"
        run_id = self.tracker.start_parent(name, cfg.model_dump(mode="json"), tags)
        job = Job(run_id, kind, cfg, requested=requested(cfg))
        self._enqueue(job, resume=True)  # the parent exists: the runner continues it
        return job

    def resume(self, run_id: str, kind: str, cfg: ExperimentConfig) -> Job:
        job = Job(run_id, kind, cfg, requested=requested(cfg))
        self._set_state(job, "queued")
        self._enqueue(job, resume=True)
        return job

    def _enqueue(self, job: Job, resume: bool) -> None:
        with self.lock:
            self.jobs[job.id] = job
        self.queue.put((job, resume))

    def cancel(self, job: Job) -> None:
        job.stop = "cancel"
        if job.state == "queued":
            self._set_state(job, "cancelled")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop running launches (they become ``interrupted``) and the worker threads."""
        self.closing = True
        for job in list(self.jobs.values()):
            if job.state in LIVE:
                job.stop = "shutdown"
        for _ in self.threads:
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --------------------------------------------------------------- running
    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            job, resume = item
            if job.stop is not None:
                continue
            self._run(job, resume)

    def _run(self, job: Job, resume: bool) -> None:
        """Run a launch in a child process; relay its progress; stop it with SIGINT."""
        self._set_state(job, "running")
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        config = job.config.model_dump(mode="json")
        if self.ray_address and not config["search"]["ray_address"]:
            config["search"]["ray_address"] = self.ray_address  # the service's own Ray
        proc = context.Process(
            target=_job_process, args=(config, job.id, sender), name=f"autoprune-{job.id[:8]}"
        )
        proc.start()
        sender.close()
        outcome: tuple[Any, ...] | None = None
        signalled: float | None = None
        while outcome is None:
            # A stop is signalled once, and again after the grace in which the launch treats
            # a repeat as the same stop: one sent before its handler was installed (a launch
            # still starting up with SIGINT ignored) is not lost.
            resend = signalled is not None and time.monotonic() - signalled > REPEAT_GRACE_S + 1
            if job.stop is not None and (signalled is None or resend) and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                signalled = time.monotonic()
            try:
                if not receiver.poll(0.2):
                    if not proc.is_alive() and not receiver.poll(0):
                        break
                    continue
                message = receiver.recv()
            except (EOFError, OSError):
                break
            if message[0] == "progress":
                _, job.done, job.best, job.cost = message
            else:
                outcome = message
        proc.join(30)
        stopped_by_signal = proc.exitcode in (-signal.SIGTERM, -signal.SIGINT, 143)
        if outcome is None and (self.closing or job.stop is not None or stopped_by_signal):
            outcome = ("stopped", None)  # stopped or killed with the service: resumable
        if outcome is None:
            outcome = ("failed", f"the search process died (exit code {proc.exitcode})")
        if outcome[0] == "finished":
            self._set_state(job, "finished")
        elif outcome[0] == "stopped" and job.stop == "cancel":
            self.close_runs(job.id, "KILLED")
            self._set_state(job, "cancelled")
        elif outcome[0] == "stopped":  # shutdown: the tag stays "running", read as interrupted
            self.close_runs(job.id, "KILLED")
            job.state = "interrupted"
        else:
            job.error = str(outcome[1])
            self.tracker.client.set_tag(job.id, ERROR_TAG, job.error)
            self.close_runs(job.id, "FAILED")
            self._set_state(job, "failed")

    def close_runs(self, run_id: str, status: str) -> None:
        """End a launch's MLflow runs that its process left ``RUNNING`` (killed, or stopped
        before it could end them): its searches, then the launch itself. Evaluations a search
        journaled but did not get into MLflow before it stopped are uploaded first, so that its
        status counts everything it did (a resume would recover them the same way)."""
        for child in self.tracker.child_runs(run_id):
            if child["status"] != "FINISHED":
                self._upload_journal(child["run_id"])
            if child["status"] == "RUNNING":
                self.tracker.client.set_terminated(child["run_id"], status)
        if self.tracker.get_run(run_id).info.status == "RUNNING":
            self.tracker.client.set_terminated(run_id, status)

    def _upload_journal(self, run_id: str) -> None:
        """The launch process's local journal (in this service's working folder, which launches
        share) into MLflow: what is missing there only."""
        try:
            _recover(self.tracker, Journal(run_id), run_id)
        except Exception as exc:  # best effort (a resume retries it): a bad row or an MLflow
            # error must neither end a worker thread nor stop the service from starting
            print(f"autoprune: journal of run {run_id} not uploaded: {exc!r}", file=sys.stderr)

    def _set_state(self, job: Job, state: str) -> None:
        # The record first: a status read between the two (job no longer live, tag not yet
        # written) would report a cancelled or finished launch as interrupted.
        self.tracker.client.set_tag(job.id, STATE_TAG, state)
        job.state = state
