"""The parts of tracking that need no MLflow: URIs, errors, run summaries, and a fast reader.

``import mlflow`` and opening a store through ``MlflowClient`` (SQLAlchemy, a schema check) cost
3-5 s on a 2-core machine, which made ``autoprune best`` and ``autoprune runs`` take 5-6 s to
print a few lines. :class:`SqliteRuns` answers those read-only questions straight from a local
MLflow sqlite database and its file artifacts with the standard library's ``sqlite3`` (tens of
milliseconds), opened read-only. :func:`run_reader` uses it when it can and falls back to
MLflow's client (:class:`autoprune.tracking.tracker.TrackingStore`) for servers, other databases, remote
artifact stores, or a schema it does not recognise; both give the same answers (tested on the
same store).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Logged once per evaluation (step = evaluation index); everything else in a run is a summary.
EVALUATION_METRICS = (
    "reward",
    "accuracy",
    "loss",
    "flops_ratio",
    "params_ratio",
    "latency_ratio",
    "best_accuracy",
    "meets_budget",
)
# Set for the process when talking to an MLflow server, unless the user set them: MLflow's own
# defaults (7 retries with exponential backoff, 120 s timeout) hang a search for minutes.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
SEARCHER_NAME = re.compile(r"[\w.-]+")


class TrackingError(RuntimeError):
    """A tracking store that cannot be used, or a run, experiment or artifact that is missing."""


# ---------------------------------------------------------------------------------- URIs
def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use; ``None``: ``$MLFLOW_TRACKING_URI``, else ``<cwd>/mlflow.db``.

    The sqlite default is MLflow 3's own (its ``./mlruns`` file store raises unless
    ``MLFLOW_ALLOW_FILE_STORE=true``). A bare path ending in ``.db`` becomes a sqlite URI.
    """
    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or str(Path.cwd() / "mlflow.db")
    if "://" not in uri and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    return uri


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with one clear line, when ``uri`` cannot be a working tracking store.

    http(s): ``GET <uri>/health`` must answer within ``timeout`` seconds (MLflow's client would
    retry for minutes), and MLflow's HTTP retry/timeout settings are lowered for the process.
    sqlite: the database's folder must exist. Other SQLAlchemy databases are passed through.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        _check_server(uri, timeout)
    elif scheme.split("+")[0] == "sqlite":
        folder = sqlite_path(uri).parent
        if not folder.is_dir():
            raise TrackingError(
                f"cannot create the MLflow database {uri}: folder {folder} does not exist"
            )
    elif scheme.split("+")[0] not in DATABASE_SCHEMES:
        raise TrackingError(
            f"unsupported tracking URI {uri!r}: use a path ending in .db, sqlite:///path.db, "
            "an http(s):// MLflow server, or a postgresql/mysql/mssql database URI"
        )


def _check_server(uri: str, timeout: float) -> None:
    """GET ``<uri>/health``; the timeout is split between connecting and reading."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout / 2) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is not healthy: GET /health answered HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason}") from None


def is_sqlite(uri: str) -> bool:
    return urlsplit(uri).scheme.lower().split("+")[0] == "sqlite"


def sqlite_path(uri: str) -> Path:
    """The database file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    path = uri.split("://", 1)[1].removeprefix("/").split("?", 1)[0]
    return Path(path or ":memory:").expanduser().resolve()


def require_database(uri: str) -> None:
    """A sqlite store must exist to be read: querying a folder where nothing was recorded is an
    error, not a new empty ``mlflow.db`` (and MLflow's table-creation lines on stderr)."""
    if is_sqlite(uri) and not sqlite_path(uri).is_file():
        raise TrackingError(
            f"no MLflow database at {sqlite_path(uri)}: nothing was recorded there "
            "(run a search first, or pass --tracking-uri)"
        )


def check_searcher_name(searcher: str) -> None:
    if not SEARCHER_NAME.fullmatch(searcher):
        raise TrackingError(f"invalid searcher name {searcher!r}")


# ------------------------------------------------------------------------- summaries
def run_summary(
    run_id: str,
    name: str | None,
    status: str,
    start_time_ms: int | None,
    tags: dict[str, str],
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The row ``runs`` / ``list_runs`` shows for a run, from its tags and latest metrics."""
    seed = tags.get("autoprune.seed")
    evaluations = metrics.get("evaluations")
    started = None
    if start_time_ms is not None:
        started = datetime.fromtimestamp(start_time_ms / 1000, tz=UTC).isoformat(timespec="seconds")
    return {
        "run_id": run_id,
        "name": name,
        "kind": tags.get("autoprune.kind"),
        "searcher": tags.get("autoprune.searcher"),
        "seed": None if seed is None else int(seed),
        "status": status,
        "start_time": started,
        "best_search_accuracy": metrics.get("best_search_accuracy"),
        "evaluations": None if evaluations is None else int(evaluations),
        "parent_id": tags.get("mlflow.parentRunId"),
        "metrics": {k: v for k, v in metrics.items() if k not in EVALUATION_METRICS},
    }


def policy_rank(metrics: dict[str, float]) -> float:
    """What ``best`` ranks finished searches by: the best policy's own accuracy (evaluated like
    every policy) when recorded; NetAdapt's search accuracy includes fine-tunes."""
    return float(metrics.get("policy_accuracy", metrics.get("best_search_accuracy", -1.0)))


def no_best_policy(experiment: str, searcher: str | None) -> TrackingError:
    which = f"searcher {searcher!r}" if searcher else "any searcher"
    return TrackingError(
        f"experiment {experiment!r} has no finished search run of {which} with a best policy"
    )


def no_policy_file(run_id: str) -> TrackingError:
    return TrackingError(
        f"MLflow run {run_id} has no best_policy.json (the search did not finish, "
        "or found no policy within the budget)"
    )


# ------------------------------------------------------------------------ the reader
class RunReader(Protocol):
    uri: str

    def list_runs(self, experiment: str) -> list[dict[str, Any]]: ...

    def best_policy(
        self, experiment: str | None = None, searcher: str | None = None, run_id: str | None = None
    ) -> tuple[dict[str, Any], str]: ...


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
        """``(policy dict, run id)`` like :meth:`autoprune.tracking.tracker.TrackingStore.best_policy`."""
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
    from autoprune.tracking.tracker import TrackingStore

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
                "latency_ratio": m.get("best_latency_measured"),
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
        from autoprune.tracking.tracker import TrackingStore

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
