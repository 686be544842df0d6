"""Reading recorded runs: MLflow's client, a fast sqlite reader, and the one that picks.

:class:`TrackingStore` reads any tracking store through :class:`mlflow.tracking.MlflowClient`:
a run's history (``history/*.jsonl`` chunks, so it works while the search runs or after it was
killed), its config, the best policy of an experiment, run lists. ``mlflow`` is imported only
when one is opened.

``import mlflow`` and opening a store through ``MlflowClient`` (SQLAlchemy, a schema check) cost
3-5 s on a 2-core machine, which made ``autoprune best`` and ``autoprune runs`` take 5-6 s to
print a few lines. :class:`SqliteRuns` answers those read-only questions straight from a local
MLflow sqlite database and its file artifacts with the standard library's ``sqlite3`` (tens of
milliseconds), opened read-only. :func:`run_reader` uses it when it can and falls back to
:class:`TrackingStore` for servers, other databases, remote artifact stores, or a schema it
does not recognise; both give the same answers (tested on the same store).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import yaml

from autoprune.tracking.store import (
    HISTORY_DIR,
    TrackingError,
    check_searcher_name,
    check_tracking_uri,
    first_line,
    is_sqlite,
    no_best_policy,
    no_policy_file,
    policy_rank,
    require_database,
    resolve_tracking_uri,
    run_summary,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow.entities import Run


class RunReader(Protocol):
    """The read-only questions ``best``, ``runs`` and ``compare --recorded`` ask a store."""

    uri: str

    def list_runs(self, experiment: str) -> list[dict[str, Any]]: ...

    def best_policy(
        self, experiment: str | None = None, searcher: str | None = None, run_id: str | None = None
    ) -> tuple[dict[str, Any], str]: ...


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No tqdm progress bars while reading our (small) artifacts."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


# ---------------------------------------------------------------------------- MLflow
class TrackingStore:
    """Read access to a tracking store: history, best policy, run lists (no experiment made)."""

    creates = False  # a reader never creates a database (MLflow would make an empty one)

    def __init__(self, uri: str | None = None, timeout: float = 10.0) -> None:
        self.uri = resolve_tracking_uri(uri)
        check_tracking_uri(self.uri, timeout)
        if not self.creates:
            require_database(self.uri)
        from mlflow.tracking import MlflowClient  # seconds: only once a store is opened

        self.client = MlflowClient(tracking_uri=self.uri)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn MLflow's (long) exceptions into one-line TrackingErrors."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(f"cannot {action}: not found at {self.uri}") from None
            raise TrackingError(f"cannot {action}: {first_line(exc)}") from exc

    def _experiment_id(self, name: str) -> str:
        with self._errors(f"look up experiment {name!r}"):
            experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            raise TrackingError(f"no MLflow experiment named {name!r} at {self.uri}")
        return str(experiment.experiment_id)

    def get_run(self, run_id: str) -> Run:
        with self._errors(f"find MLflow run {run_id!r}"):
            return self.client.get_run(run_id)

    def _search(self, experiment_id: str, filter_string: str = "", order_by: str = "") -> list[Run]:
        runs: list[Run] = []
        token = None
        with self._errors(f"search runs of experiment {experiment_id}"):
            while True:
                page = self.client.search_runs(
                    [experiment_id],
                    filter_string,
                    max_results=1000,
                    order_by=[order_by] if order_by else None,
                    page_token=token,
                )
                runs.extend(page)
                token = page.token
                if not token:
                    return runs

    @contextmanager
    def _download(self, run_id: str, path: str) -> Iterator[Path]:
        """An artifact (file or folder) downloaded into a temporary folder, removed afterwards."""
        with (
            tempfile.TemporaryDirectory(prefix="autoprune-mlflow-") as tmp,
            self._errors(f"read {path} of run {run_id}"),
            _quiet_downloads(),
        ):
            yield Path(self.client.download_artifacts(run_id, path, tmp))

    def _has_artifact(self, run_id: str, path: str) -> bool:
        folder = os.path.dirname(path) or None
        with self._errors(f"list the artifacts of run {run_id}"):
            return any(f.path == path for f in self.client.list_artifacts(run_id, folder))

    def config_of(self, run_id: str) -> dict[str, Any]:
        """The ``config.yaml`` a launch (parent run) recorded."""
        if not self._has_artifact(run_id, "config.yaml"):
            raise TrackingError(f"run {run_id} has no config.yaml: not an autoprune launch")
        with self._download(run_id, "config.yaml") as path:
            data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise TrackingError(f"config.yaml of run {run_id} is not a mapping")
        return data

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Every flushed evaluation of a run (``Record.to_dict()`` form), sorted by index.

        Read from the run's ``history/*.jsonl`` chunks, so it works while the search runs, after
        it was killed, and from any machine that reaches the tracking server.
        """
        self.get_run(run_id)
        with self._errors(f"list the history of run {run_id}"):
            chunks = self.client.list_artifacts(run_id, HISTORY_DIR)
        if not chunks:
            return []
        rows: dict[int, dict[str, Any]] = {}
        with self._download(run_id, HISTORY_DIR) as folder:
            for chunk in sorted(folder.glob("*.jsonl")):
                for line in chunk.read_text().splitlines():
                    row = json.loads(line)
                    rows[row["index"]] = row  # a chunk re-sent after a failed flush: last wins
        return [rows[i] for i in sorted(rows)]

    def logged_steps(self, run_id: str, key: str = "accuracy") -> set[int]:
        """The steps (evaluation indices) that have the per-evaluation metric ``key``."""
        with self._errors(f"read the {key} history of run {run_id}"):
            return {int(m.step) for m in self.client.get_metric_history(run_id, key)}

    def best_policy(
        self,
        experiment: str | None = None,
        searcher: str | None = None,
        run_id: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """``(policy dict, run id)``: of ``run_id``, or else of the finished search run (of
        ``searcher``, when given) with the highest ``best_search_accuracy`` in ``experiment``.
        """
        if run_id is None:
            if experiment is None:
                raise TrackingError("best_policy needs an experiment name or a run id")
            run_id = self._best_run(experiment, searcher)
        else:
            self.get_run(run_id)
            if not self._has_artifact(run_id, "best_policy.json"):
                raise no_policy_file(run_id)
        with self._download(run_id, "best_policy.json") as path:
            return json.loads(path.read_text()), run_id

    def _best_run(self, experiment: str, searcher: str | None) -> str:
        filters = [
            "tags.`autoprune.kind` = 'search'",
            "attributes.status = 'FINISHED'",
            "metrics.best_search_accuracy >= 0",
        ]
        if searcher is not None:
            check_searcher_name(searcher)
            filters.append(f"tags.`autoprune.searcher` = '{searcher}'")
        runs = self._search(self._experiment_id(experiment), " and ".join(filters))
        # Rank by the best policy's own accuracy (evaluated like every other policy) when the run
        # has it: NetAdapt's search accuracy is measured after fine-tunes, not comparable.
        runs.sort(key=lambda run: policy_rank(run.data.metrics), reverse=True)
        for run in runs:
            if self._has_artifact(run.info.run_id, "best_policy.json"):
                return str(run.info.run_id)
        raise no_best_policy(experiment, searcher)

    def list_runs(self, experiment: str) -> list[dict[str, Any]]:
        """Every run of an experiment (parents and searches), oldest first."""
        runs = self._search(self._experiment_id(experiment), order_by="attributes.start_time ASC")
        return [self._summary(run) for run in runs]

    def child_runs(self, parent_id: str) -> list[dict[str, Any]]:
        """The search runs started under a parent run, oldest first."""
        parent = self.get_run(parent_id)
        runs = self._search(
            parent.info.experiment_id,
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            order_by="attributes.start_time ASC",
        )
        return [self._summary(run) for run in runs]

    @staticmethod
    def _summary(run: Run) -> dict[str, Any]:
        return run_summary(
            run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
            dict(run.data.tags), dict(run.data.metrics),
        )  # fmt: skip


# -------------------------------------------------------------------------- fast path
class Unsupported(Exception):
    """This store cannot be read directly (the caller falls back to MLflow's client)."""


_NEEDED = {
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
    "runs": {
        "run_uuid",
        "name",
        "status",
        "start_time",
        "lifecycle_stage",
        "artifact_uri",
        "experiment_id",
    },
    "tags": {"key", "value", "run_uuid"},
    "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
}


class SqliteRuns:
    """Read-only answers from a local MLflow sqlite database and its ``file:`` artifacts."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        path = sqlite_path(uri)
        try:
            self._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
            columns = {
                table: {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for table in _NEEDED
            }
        except sqlite3.Error as exc:
            raise Unsupported(str(exc)) from exc
        for table, needed in _NEEDED.items():
            if not needed <= columns[table]:
                raise Unsupported(f"table {table} lacks {sorted(needed - columns[table])}")
        self._workspaces = "workspace" in columns["experiments"]

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise Unsupported(str(exc)) from exc

    def _experiment_id(self, name: str) -> int:
        sql = "SELECT experiment_id FROM experiments WHERE name = ?"
        if self._workspaces:
            sql += " AND workspace = 'default'"
        rows = self._query(sql, (name,))
        if not rows:
            raise TrackingError(f"no MLflow experiment named {name!r} at {self.uri}")
        return int(rows[0][0])

    def _runs(
        self, where: str, args: tuple[Any, ...], oldest_first: bool, active: bool = True
    ) -> list[dict[str, Any]]:
        """Runs matching ``where`` (active ones, as MLflow searches), in MLflow's order."""
        order = "start_time ASC" if oldest_first else "start_time DESC"
        stage = "lifecycle_stage = 'active' AND " if active else ""
        rows = self._query(
            "SELECT run_uuid, name, status, start_time, artifact_uri FROM runs "
            f"WHERE {stage}{where} ORDER BY {order}, run_uuid",
            args,
        )
        if not rows:
            return []
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        tags: dict[str, dict[str, str]] = {i: {} for i in ids}
        for key, value, run in self._query(
            f"SELECT key, value, run_uuid FROM tags WHERE run_uuid IN ({marks})", tuple(ids)
        ):
            tags[run][key] = value
        metrics: dict[str, dict[str, float]] = {i: {} for i in ids}
        for key, value, is_nan, run in self._query(
            f"SELECT key, value, is_nan, run_uuid FROM latest_metrics WHERE run_uuid IN ({marks})",
            tuple(ids),
        ):
            metrics[run][key] = float("nan") if is_nan else float(value)
        return [
            {"run_id": r[0], "name": r[1], "status": r[2], "start_time": r[3],
             "artifact_uri": r[4], "tags": tags[r[0]], "metrics": metrics[r[0]]}
            for r in rows
        ]  # fmt: skip

    def list_runs(self, experiment: str) -> list[dict[str, Any]]:
        """Every run of an experiment (parents and searches), oldest first."""
        runs = self._runs("experiment_id = ?", (self._experiment_id(experiment),), True)
        return [
            run_summary(r["run_id"], r["name"], r["status"], r["start_time"], r["tags"],
                        r["metrics"])
            for r in runs
        ]  # fmt: skip

    def _artifact(self, artifact_uri: str | None, name: str) -> Path:
        if not artifact_uri:
            raise Unsupported("run without an artifact location")
        parts = urlsplit(artifact_uri)
        if parts.scheme == "file":
            root = Path(unquote(parts.path))
        elif parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
            root = Path(artifact_uri)
        else:
            raise Unsupported(f"artifacts at {artifact_uri}")  # a server or object store
        return root / name

    def best_policy(
        self, experiment: str | None = None, searcher: str | None = None, run_id: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """``(policy dict, run id)`` like :meth:`TrackingStore.best_policy`."""
        if run_id is not None:
            runs = self._runs("run_uuid = ?", (run_id,), False, active=False)
            if not runs:
                raise TrackingError(f"cannot find MLflow run {run_id!r}: not found at {self.uri}")
            path = self._artifact(runs[0]["artifact_uri"], "best_policy.json")
            if not path.is_file():
                raise no_policy_file(run_id)
            return json.loads(path.read_text()), run_id
        if experiment is None:
            raise TrackingError("best_policy needs an experiment name or a run id")
        if searcher is not None:
            check_searcher_name(searcher)
        runs = self._runs(
            "experiment_id = ? AND status = 'FINISHED'", (self._experiment_id(experiment),), False
        )
        candidates = [
            r for r in runs
            if r["tags"].get("autoprune.kind") == "search"
            and (searcher is None or r["tags"].get("autoprune.searcher") == searcher)
            and r["metrics"].get("best_search_accuracy", -1.0) >= 0
        ]  # fmt: skip
        candidates.sort(key=lambda r: policy_rank(r["metrics"]), reverse=True)
        for run in candidates:
            path = self._artifact(run["artifact_uri"], "best_policy.json")
            if path.is_file():
                return json.loads(path.read_text()), run["run_id"]
        raise no_best_policy(experiment, searcher)


def run_reader(uri: str | None = None) -> RunReader:
    """The fastest reader that can answer for ``uri``: :class:`SqliteRuns` for a local sqlite
    store, else MLflow's client (imported only then)."""
    resolved = resolve_tracking_uri(uri)
    if is_sqlite(resolved):
        check_tracking_uri(resolved)
        require_database(resolved)
        try:
            return _Fallback(SqliteRuns(resolved), resolved)
        except Unsupported:
            pass
    return TrackingStore(resolved)


def recorded_comparison(tracker_uri: str | None, experiment: str) -> list[dict[str, Any]]:
    """The comparison rows of the searches already recorded in an experiment (newest last)."""
    rows = []
    for run in run_reader(tracker_uri).list_runs(experiment):
        if run.get("kind") != "search":
            continue
        m = run.get("metrics") or {}
        rows.append(
            {
                "searcher": run["searcher"],
                "seed": run["seed"],
                "status": run["status"],
                "best_search_accuracy": m.get("best_search_accuracy"),
                "policy_accuracy": m.get("policy_accuracy"),
                "test_accuracy": m.get("test_accuracy"),
                "flops_ratio": m.get("best_flops_ratio"),
                "latency_ratio_measured": m.get("best_latency_measured"),
                "latency_ratio_table": m.get("best_latency_table"),
                "evaluations": m.get("evaluations"),
                "seconds": m.get("search_seconds"),
                "run_id": run["run_id"],
            }
        )
    return rows


class _Fallback:
    """A :class:`SqliteRuns` that hands a question to MLflow when it meets what it cannot read."""

    def __init__(self, fast: SqliteRuns, uri: str) -> None:
        self.fast, self.uri = fast, uri

    def _slow(self) -> RunReader:
        return TrackingStore(self.uri)

    def list_runs(self, experiment: str) -> list[dict[str, Any]]:
        try:
            return self.fast.list_runs(experiment)
        except Unsupported:
            return self._slow().list_runs(experiment)

    def best_policy(
        self, experiment: str | None = None, searcher: str | None = None, run_id: str | None = None
    ) -> tuple[dict[str, Any], str]:
        try:
            return self.fast.best_policy(experiment, searcher, run_id)
        except Unsupported:
            return self._slow().best_policy(experiment, searcher, run_id)
