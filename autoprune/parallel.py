"""Parallel evaluation: a serial backend and a Ray pool of evaluator actors, one interface.

Evaluations (prune, recalibrate batch norm, measure accuracy; for NetAdapt a short fine-tune too)
are the whole cost of a search. A :class:`RayBackend` starts ``workers`` actors that each hold
the task (model, data, pruning plan and channel ranking) once; what travels per call is a policy
(a few floats) and metrics back. A :class:`SerialBackend` has the same interface and runs in
the calling process (tests, debugging, ``--workers 0``).

Both backends give the same results for the same calls: a worker rebuilds the task from the
driver's own model, data, channel scores and latency table (:class:`TaskSpec`), so nothing is
re-derived differently on another machine.

Where Ray runs: by default a local Ray started with ``num_cpus = workers``, each actor using
``cores // workers`` torch threads; ``ray_address`` (``auto``, ``host:port`` or ``ray://...``)
joins an existing cluster instead, one torch thread per actor. A worker that dies mid-call is
replaced and its call re-run (up to ``max_restarts`` times per call); an exception raised by the
model inside a call is raised at once as :class:`EvaluationError` naming the policy.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.config import TaskConfig
from autoprune.data import DataSplits
from autoprune.evaluate import Evaluation, EvaluationMemo, Evaluator
from autoprune.task import Task

OBJECT_STORE_BYTES = 200 * 1024**2  # a local Ray's object store: tasks and policies are small
MAX_RESTARTS = 3


class ParallelError(RuntimeError):
    """Ray cannot be reached, or workers keep dying."""


class EvaluationError(RuntimeError):
    """A call failed inside a worker (the model or the policy raised)."""


# ------------------------------------------------------------------ the task, shipped


@dataclass
class TaskSpec:
    """Everything a worker needs to rebuild a task exactly as the driver has it."""

    config: dict[str, Any]
    model: nn.Module
    data: DataSplits
    checkpoint: str | None
    checkpoint_digest: str
    scores: list[np.ndarray]
    latency_table: Any = None  # costs.LatencyTable when the driver built one
    metric: Any = None  # a user's metric: pickled by value or importable on the workers
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, task: Task, latency_table: bool = False) -> TaskSpec:
        """Snapshot a task (its ranking is computed now, on the driver, if not yet)."""
        model = copy.deepcopy(task.model).cpu()
        return cls(
            config=task.config.model_dump(mode="json"),
            model=model,
            data=task.data,
            checkpoint=str(task.checkpoint) if task.checkpoint is not None else None,
            checkpoint_digest=task.checkpoint_hash,
            metric=task.metric,
            scores=[np.asarray(s) for s in task.scores],
            latency_table=task.latency_table if latency_table else None,
        )

    def build(self) -> Task:
        """The task on this process (model on the config's device; nothing re-scored)."""
        from autoprune.training import resolve_device

        config = TaskConfig.model_validate(self.config)
        model = copy.deepcopy(self.model).to(resolve_device(config.device))
        ckpt = Path(self.checkpoint) if self.checkpoint is not None else None
        task = Task(config, model, self.data, ckpt, self.checkpoint_digest, self.metric)
        task.__dict__["scores"] = [s.copy() for s in self.scores]  # cached_property values
        if self.latency_table is not None:
            task.__dict__["latency_table"] = self.latency_table
        return task


_TASKS: dict[str, Task] = {}  # per process: the task of the last spec seen


def worker_task(spec: TaskSpec) -> Task:
    """The task of a spec, built once per process (env actors and evaluator actors use it)."""
    if spec.key not in _TASKS:
        _TASKS.clear()
        _TASKS[spec.key] = spec.build()
    return _TASKS[spec.key]


# ------------------------------------------------------------------ backends


Job = tuple[Any, ...]
WorkerFn = Callable[..., Any]  # fn(task, *job)


class Backend(ABC):
    """Runs evaluations (and other per-task calls) for a searcher."""

    workers: int = 0

    def __init__(self, task: Task, latency: bool | None = None, predict_latency: bool = False):
        self.task = task
        self.latency = latency
        self.predict_latency = predict_latency

    @abstractmethod
    def map(
        self, vecs: Sequence[np.ndarray], reject_below: float | None = None
    ) -> list[Evaluation]:
        """Evaluate ratio vectors; results in the same order. ``reject_below``: the caller's
        best accuracy so far, for early rejection (:meth:`Evaluator.evaluate`)."""

    @abstractmethod
    def run(self, fn: WorkerFn, jobs: Sequence[Job], describe: Callable[[Job], str]) -> list[Any]:
        """``fn(task, *job)`` for every job (module-level ``fn``); results in job order.
        ``describe(job)`` names a job in errors."""

    @abstractmethod
    def preload(self, evaluations: Sequence[Evaluation]) -> None:
        """Answer these policies from memory (a resumed search replays what it recorded)."""

    def put(self, obj: Any) -> Any:
        """A handle to send ``obj`` once to every call of :meth:`run` (identity when serial)."""
        return obj

    def close(self) -> None:  # noqa: B027 - nothing to release unless overridden
        """Release the workers."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialBackend(Backend):
    """Everything in this process, through one :class:`Evaluator` (and its cache)."""

    def __init__(
        self,
        task: Task,
        latency: bool | None = None,
        predict_latency: bool = False,
        evaluator: Evaluator | None = None,
    ) -> None:
        super().__init__(task, latency, predict_latency)
        self.evaluator = evaluator or Evaluator(task, latency, predict_latency)

    def map(
        self, vecs: Sequence[np.ndarray], reject_below: float | None = None
    ) -> list[Evaluation]:
        return [self.evaluator.evaluate(v, reject_below) for v in vecs]

    def preload(self, evaluations: Sequence[Evaluation]) -> None:
        self.evaluator.preload(evaluations)

    def run(self, fn: WorkerFn, jobs: Sequence[Job], describe: Callable[[Job], str]) -> list[Any]:
        return [fn(self.task, *job) for job in jobs]


def policy_text(task: Task, vec: np.ndarray) -> str:
    """A policy, short enough for an error message."""
    ratios = ", ".join(f"{n}={r:.3f}" for n, r in zip(task.units, vec, strict=True))
    return f"{{{ratios}}}"


class _Actor:
    """A Ray actor holding a task and an evaluator (made remote by :class:`RayBackend`)."""

    def __init__(
        self, spec: TaskSpec, threads: int, latency: bool | None, predict_latency: bool
    ) -> None:
        torch.set_num_threads(threads)
        self.task = worker_task(spec)
        self.evaluator = Evaluator(self.task, latency, predict_latency)

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, vec: np.ndarray, reject_below: float | None = None) -> Evaluation:
        return self.evaluator.evaluate(vec, reject_below)

    def call(self, fn: WorkerFn, *job: Any) -> Any:
        return fn(self.task, *job)


def init_ray(workers: int, address: str | None = None) -> None:
    """Connect to Ray: join ``address`` (``auto``, ``host:port``, ``ray://...``) or start a local
    Ray with ``num_cpus = workers``. Does nothing when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)  # Ray itself retries an unreachable address for minutes
    # ray.init replaces the driver's SIGTERM handler with a plain sys.exit; a handler the
    # process installed itself (a service's launch records that it was asked to stop) is kept.
    own = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            own = handler
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ParallelError(f"cannot start or reach {where}: {first}") from None
    finally:
        if own is not None:
            signal.signal(signal.SIGTERM, own)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when ``host:port`` (or ``ray://host:port``) accepts no connection."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ParallelError(
            f"bad Ray address {address!r}: use 'auto', 'host:port' or 'ray://host:port'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ParallelError(
            f"cannot start or reach the Ray cluster at {address}: {err.strerror or err}"
        ) from None


class RayBackend(Backend):
    """A pool of ``workers`` Ray evaluator actors (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        workers: int,
        ray_address: str | None = None,
        latency: bool | None = None,
        predict_latency: bool = False,
        threads: int | None = None,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a Ray backend needs workers >= 1, got {workers}")
        super().__init__(task, latency, predict_latency)
        import ray

        init_ray(workers, ray_address)
        self.workers = workers
        cores = os.cpu_count() or 1
        self.threads = threads or (1 if ray_address else max(1, cores // workers))
        self.max_restarts = max_restarts
        self.restarts = 0
        self.spec = TaskSpec.of(task, latency_table=predict_latency)
        try:  # cloudpickle: the model, data and metric travel by value or by import
            self.spec_ref = ray.put(self.spec)
        except Exception as exc:
            raise ParallelError(
                f"the task cannot be sent to Ray workers ({type(exc).__name__}: {exc}); its "
                "model, data and metric must be picklable (plain tensors, Datasets and "
                "DataLoaders without open handles; classes importable on the workers or defined "
                "in __main__). Use workers=0 to evaluate in this process"
            ) from exc
        self._remote = ray.remote(num_cpus=1)(_Actor)
        self.actors: list[Any] = []  # started on first use; see release()
        self.memo = EvaluationMemo(task.config.eval.cache_size)  # the driver's, for every actor
        self.recorded: list[Evaluation] = []
        self.calls = 0

    def _new_actor(self) -> Any:
        return self._remote.remote(self.spec_ref, self.threads, self.latency, self.predict_latency)

    # ------------------------------------------------------------ evaluations
    def _key(self, vec: np.ndarray) -> tuple[int, ...]:
        return tuple(int(c) for c in self.task.space.removed_counts(vec))

    def preload(self, evaluations: Sequence[Evaluation]) -> None:
        self.recorded.extend(evaluations)  # DDPG's environment actors get them too
        for e in evaluations:
            self.memo.record(self._key(self.task.ratio_vector(e.ratios)), e)

    def map(
        self, vecs: Sequence[np.ndarray], reject_below: float | None = None
    ) -> list[Evaluation]:
        vecs = [self.task.ratio_vector(v) for v in vecs]
        keys = [self._key(v) for v in vecs]
        self.calls += len(vecs)
        todo: dict[tuple[int, ...], np.ndarray] = {}
        for key, vec in zip(keys, vecs, strict=True):
            if key not in todo and not self.memo.answers(key, reject_below):
                todo[key] = vec
        jobs = [(vec,) for vec in todo.values()]
        results = self._schedule(
            lambda actor, job: actor.evaluate.remote(job[0], reject_below),
            jobs,
            lambda job: f"evaluating policy {policy_text(self.task, job[0])}",
        )
        fresh = dict(zip(todo, results, strict=True))
        for key, e in fresh.items():
            self.memo.put(key, e)
        out, seen = [], set()
        for key in keys:
            if key in fresh and key not in seen:  # the first occurrence is the evaluation
                seen.add(key)
                out.append(fresh[key])
            else:  # recorded, cached, or a repeat within this call (even without a cache)
                hit = self.memo.get(key)
                out.append(hit or Evaluation(**{**fresh[key].to_dict(), "cached": True}))
        return out

    def run(self, fn: WorkerFn, jobs: Sequence[Job], describe: Callable[[Job], str]) -> list[Any]:
        return self._schedule(lambda actor, job: actor.call.remote(fn, *job), jobs, describe)

    def put(self, obj: Any) -> Any:
        import ray

        return ray.put(obj)

    # ------------------------------------------------------------ scheduling
    def _schedule(
        self,
        submit: Callable[[Any, Job], Any],
        jobs: Sequence[Job],
        describe: Callable[[Job], str],
    ) -> list[Any]:
        """Keep every actor busy with one call; replace dead actors and re-run their calls."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not self.actors:
            self.actors = [self._new_actor() for _ in range(self.workers)]
        results: list[Any] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        tries = [0] * len(jobs)
        idle = deque(range(len(self.actors)))
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor slot, job index)
        try:
            while pending or inflight:
                while pending and idle:
                    slot, j = idle.popleft(), pending.popleft()
                    inflight[submit(self.actors[slot], jobs[j])] = (slot, j)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                slot, j = inflight.pop(ready[0])
                try:
                    results[j] = ray.get(ready[0])
                except RayActorError as err:  # the worker died: replace it, run the call again
                    tries[j] += 1
                    if tries[j] > self.max_restarts:
                        raise ParallelError(
                            f"{describe(jobs[j])}: worker died {tries[j]} times; last: "
                            f"{_first_line(err)}"
                        ) from None
                    self._replace(slot)
                    pending.appendleft(j)
                except RayTaskError as err:
                    raise EvaluationError(
                        f"{describe(jobs[j])} failed: {_cause(err)}"
                    ) from err.as_instanceof_cause()
                idle.append(slot)
        finally:
            for ref in inflight:  # an error or Ctrl-C: stop what is still running
                ray.cancel(ref, force=False)
        return results

    def _replace(self, slot: int) -> None:
        import ray

        self.restarts += 1
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()

    def pids(self) -> list[int]:
        """Process ids of the actors, started if need be (fault tests kill them)."""
        import ray

        if not self.actors:
            self.actors = [self._new_actor() for _ in range(self.workers)]
        return list(ray.get([a.pid.remote() for a in self.actors]))

    def release(self) -> None:
        """Stop the actors, freeing their CPUs (e.g. for DDPG's environment actors); the next
        call starts new ones."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def close(self) -> None:
        self.release()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cause(err: Any) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def make_backend(
    task: Task,
    workers: int = 0,
    ray_address: str | None = None,
    latency: bool | None = None,
    predict_latency: bool = False,
    evaluator: Evaluator | None = None,
    threads: int | None = None,
) -> Backend:
    """``workers=0``: serial, in this process; otherwise a Ray pool (local or ``ray_address``)
    whose actors use ``threads`` torch threads each (default: cores // workers locally, 1 on a
    cluster)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        if ray_address:
            raise ValueError("ray_address needs workers >= 1")
        return SerialBackend(task, latency, predict_latency, evaluator)
    return RayBackend(task, workers, ray_address, latency, predict_latency, threads)
