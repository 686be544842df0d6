"""The tracking store, without MLflow: which store a URI names, whether it can be used, and how
autoprune's runs are laid out in it.

Everything here is plain Python (no ``import mlflow``, which costs seconds), so the read-only
commands and every other tracking module share it: :class:`TrackingError` (what every tracking
module raises), the URI rules (:func:`resolve_tracking_uri`, :func:`check_tracking_uri`, the
sqlite helpers), and the layout of a recorded run: the per-evaluation metric names and
``history/`` chunks, the summary row of a run (:func:`run_summary`) and what ``best`` ranks
finished searches by (:func:`policy_rank`).
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Logged once per evaluation (step = evaluation index); everything else in a run is a summary.
EVALUATION_METRICS = (
    "reward",
    "accuracy",
    "loss",
    "flops_ratio",
    "params_ratio",
    "latency_ratio_table",
    "latency_ratio",  # the per-evaluation name of latency_ratio_table before 2026-12-08
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
HISTORY_DIR = "history"  # a run's per-evaluation rows: history/<first>-<last>.jsonl chunks


class TrackingError(RuntimeError):
    """A tracking store that cannot be used, or a run, experiment or artifact that is missing."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (MLflow's are long), for a TrackingError."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
