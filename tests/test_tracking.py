"""MLflow tracking: runs and tags, batched metrics, artifacts, queries, unreachable stores.

Searches are simulated with hand-made records (no model is built); every test has its own
sqlite store under ``tmp_path``, and one test drives a real ``mlflow server`` subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from autoprune.agents.base import Record, SearchResult
from mlflow.entities import Metric

from autoprune.policy import Policy
from autoprune.tracking.reader import SqliteRuns, TrackingStore, Unsupported, run_reader
from autoprune.tracking.store import TrackingError, check_tracking_uri, resolve_tracking_uri
from autoprune.tracking.writer import SearchLogger, Tracker

UNITS = ("stem", "layers.0.c1", "layers.1.c1")
BUDGET = {"flops": 0.25}
CONFIG = {"model": {"name": "toy", "kwargs": {}}, "budget": BUDGET, "notes": "x" * 7000}


def make_record(index: int, shift: float = 0.0) -> Record:
    """A made-up evaluation: every third one is over budget, accuracy varies with the index."""
    flops = 0.2 if index % 3 else 0.4
    return Record.from_dict(
        {
            "index": index,
            "ratios": {unit: round(0.1 * ((index + k) % 6), 2) for k, unit in enumerate(UNITS)},
            "accuracy": 0.5 + 0.04 * (index % 10) + shift,
            "loss": 1.0 / index,
            "flops_ratio": flops,
            "params_ratio": flops + 0.05,
            "macs": flops * 4e7,
            "params": (flops + 0.05) * 3e5,
            "latency_ratio_table": None,
            "meets_budget": flops <= BUDGET["flops"],
            "eval_seconds": 0.07,
            "elapsed": 0.07 * index,
            "reward": float(index) if index % 2 else None,
            "note": "warm-up" if index <= 2 else "",
        }
    )


def simulate(
    n: int,
    callback: Callable[[Record, SearchResult], None] | None = None,
    searcher: str = "random",
    shift: float = 0.0,
) -> SearchResult:
    """What a searcher does: append each record, keep the best within budget, call back."""
    result = SearchResult(searcher, dict(BUDGET), seed=0)
    for i in range(1, n + 1):
        record = make_record(i, shift)
        result.history.append(record)
        if record.meets_budget and (result.best is None or record.accuracy > result.best.accuracy):
            result.best = record
        if callback is not None:
            callback(record, result)
    result.seconds = 0.07 * n
    return result


def policy_of(result: SearchResult) -> Policy:
    assert result.best is not None
    return Policy(
        ratios=dict(result.best.ratios),
        fingerprint={"model": "toy", "granularity": "channel"},
        metrics={"accuracy": result.best.accuracy},
        budget=dict(BUDGET),
        searcher=result.searcher,
    )


def run_search(
    tracker: Tracker, parent: str, searcher: str, n: int = 20, shift: float = 0.0
) -> tuple[str, SearchResult, Policy]:
    """One child run through the whole cycle: start, log every evaluation, finish."""
    child = tracker.start_child(parent, searcher, 0, {"evaluations": n}, {"model": "toy"})
    result = simulate(n, tracker.logger(child), searcher, shift)
    policy = policy_of(result)
    tracker.finish(child, result, policy, extra_metrics={"test_accuracy": 0.9})
    return child, result, policy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_artifact(store: TrackingStore, run_id: str, name: str, folder: Path) -> str:
    return Path(store.client.download_artifacts(run_id, name, str(folder))).read_text()


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


# --------------------------------------------------------------------------------- URIs
def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("runs/x.db") == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri(None) == "http://server:5000"


def test_bad_uris_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="does not exist"):
        Tracker(f"sqlite:///{tmp_path}/missing/mlflow.db", "exp")
    with pytest.raises(TrackingError, match="unsupported tracking URI"):
        check_tracking_uri(str(tmp_path / "mlruns"))


def test_unreachable_server_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable"):
        Tracker(uri, "exp")
    assert time.perf_counter() - start < 10
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2


# --------------------------------------------------------------------------------- runs
def test_parent_and_children(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.start_parent("launch", CONFIG, {"purpose": "test"})
    children = [tracker.start_child(parent, s, 1, {"sigma": 0.3}, {"model": "toy"}) for s in "ab"]

    run = tracker.get_run(parent)
    assert run.data.tags["autoprune.kind"] == "parent"
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["autoprune.version"]
    assert run.data.params["model.name"] == "toy"
    assert run.data.params["budget.flops"] == "0.25"
    assert run.data.params["model.kwargs"] == "{}"
    assert len(run.data.params["notes"]) == 6000  # MLflow's limit
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["autoprune.git_revision"] == head.stdout.strip()
    assert "name: toy" in read_artifact(tracker, parent, "config.yaml", tmp_path)

    child = tracker.get_run(children[0])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["autoprune.kind"] == "search"
    assert child.data.tags["autoprune.searcher"] == "a"
    assert child.data.tags["autoprune.seed"] == "1"
    assert child.data.tags["model"] == "toy"
    assert child.data.params["sigma"] == "0.3"
    listed = tracker.child_runs(parent)
    assert [r["run_id"] for r in listed] == children
    assert {r["parent_id"] for r in listed} == {parent}
    assert [r["kind"] for r in tracker.list_runs("exp")] == ["parent", "search", "search"]


def test_default_store_outside_a_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No URI: ./mlflow.db, artifacts next to it (not ./mlruns), no git revision tag."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(None, "exp")
    run = tracker.get_run(tracker.start_parent("p", {"a": 1}))
    assert (tmp_path / "mlflow.db").is_file()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "exp").as_uri())
    assert "autoprune.git_revision" not in run.data.tags


def test_logger_batches_metrics_by_step(tracker: Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = tracker.start_child(tracker.start_parent("p", {}), "random", 0, {})
    calls: list[int] = []
    log_batch = tracker.client.log_batch

    def counting(run_id: str, metrics: Sequence[Metric] = (), **kwargs: Any) -> None:
        calls.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", counting)
    logger = tracker.logger(run_id, flush_every=50, flush_seconds=60)
    assert isinstance(logger, SearchLogger)
    result = simulate(120, logger)
    logger.close()
    assert len(calls) == 3

    accuracy = tracker.client.get_metric_history(run_id, "accuracy")
    assert sorted(m.step for m in accuracy) == list(range(1, 121))
    assert {m.step: m.value for m in accuracy}[7] == pytest.approx(make_record(7).accuracy)
    rewards = tracker.client.get_metric_history(run_id, "reward")
    assert sorted(m.step for m in rewards) == list(range(1, 121, 2))  # None is skipped
    assert tracker.client.get_metric_history(run_id, "latency_ratio_table") == []
    best = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "best_accuracy")}
    assert min(best) == 1 and best[120] == pytest.approx(max(result.best_so_far()))
    meets = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "meets_budget")}
    assert meets[3] == 0 and meets[4] == 1
    # What tracking costs per evaluation is measured in docs/results/speed.md, not asserted here
    # (a timing on a shared machine is no pass/fail test).


def test_finish_writes_artifacts(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.start_parent("p", {})
    child, result, policy = run_search(tracker, parent, "random", n=30)

    run = tracker.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["evaluations"] == 30
    assert run.data.metrics["test_accuracy"] == 0.9
    assert result.best is not None
    assert run.data.metrics["best_search_accuracy"] == pytest.approx(result.best.accuracy)
    names = {f.path for f in tracker.client.list_artifacts(child)}
    assert {"best_so_far.png", "ratios.png", "accuracy_vs_flops.png"} <= names
    assert (
        json.loads(read_artifact(tracker, child, "best_policy.json", tmp_path)) == policy.to_dict()
    )
    rows = list(csv.DictReader(read_artifact(tracker, child, "history.csv", tmp_path).splitlines()))
    assert len(rows) == 30
    assert rows[2]["meets_budget"] == "0" and rows[0]["latency_ratio_table"] == ""
    assert rows[0]["ratio.layers.0.c1"] == str(make_record(1).ratios["layers.0.c1"])

    tracker.log_table(parent, [{"searcher": "random", "acc": 0.912345}, {"searcher": "x|y"}], "cmp")
    table = read_artifact(tracker, parent, "cmp.md", tmp_path).splitlines()
    assert table[0] == "| searcher | acc |" and table[2] == "| random | 0.9123 |"
    assert read_artifact(tracker, parent, "cmp.csv", tmp_path).startswith("searcher,acc\n")


@pytest.mark.parametrize("reader", ["mlflow", "sqlite"])
def test_best_policy_picks_the_best_finished_run(tracker: Tracker, reader: str) -> None:
    parent = tracker.start_parent("p", {})
    low, _, _ = run_search(tracker, parent, "random", shift=0.0)
    high, _, high_policy = run_search(tracker, parent, "ddpg", shift=0.02)
    killed = tracker.start_child(parent, "ddpg", 1, {})
    result = simulate(10, tracker.logger(killed), "ddpg", shift=0.05)
    tracker.finish(killed, result, policy_of(result), status="KILLED")
    deleted, _, _ = run_search(tracker, parent, "ddpg", shift=0.09)  # best, but deleted
    tracker.client.delete_run(deleted)

    # A fresh reader, as in another process: MLflow's client, or the direct sqlite reader the
    # CLI's `best` / `runs` use (the same answers, without importing MLflow).
    store = TrackingStore(tracker.uri) if reader == "mlflow" else SqliteRuns(tracker.uri)
    assert store.best_policy("exp") == (high_policy.to_dict(), high)
    assert store.best_policy("exp", searcher="random")[1] == low
    assert store.best_policy(run_id=killed)[1] == killed  # explicit run: any status
    with pytest.raises(TrackingError, match="no MLflow experiment named 'nope'"):
        store.best_policy("nope")
    with pytest.raises(TrackingError, match="no finished search run of searcher 'netadapt'"):
        store.best_policy("exp", searcher="netadapt")
    with pytest.raises(TrackingError, match="invalid searcher name"):
        store.best_policy("exp", searcher="x' or 1=1 --")
    with pytest.raises(TrackingError, match="not found"):
        store.best_policy("exp", run_id="0" * 32)
    with pytest.raises(TrackingError, match=r"no best_policy\.json"):
        store.best_policy("exp", run_id=parent)
    listed = store.list_runs("exp")
    summary = {r["run_id"]: r for r in listed}
    assert deleted not in summary
    assert summary[high]["evaluations"] == 20 and summary[killed]["status"] == "KILLED"
    assert summary[high]["metrics"]["test_accuracy"] == 0.9
    assert listed == TrackingStore(tracker.uri).list_runs("exp")  # field for field, in order


def test_run_reader_reads_sqlite_directly_and_falls_back(
    tracker: Tracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tracker.start_parent("p", {})
    child, _, policy = run_search(tracker, parent, "random")
    fast = run_reader(tracker.uri)
    assert fast.best_policy("exp") == (policy.to_dict(), child)
    assert [r["run_id"] for r in fast.list_runs("exp")] == [parent, child]
    with pytest.raises(TrackingError, match="no MLflow database"):
        run_reader(f"sqlite:///{tmp_path}/elsewhere.db")
    assert not (tmp_path / "elsewhere.db").exists()
    # Artifacts somewhere the direct reader cannot open: it hands the question to MLflow.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    with db:
        db.execute("UPDATE runs SET artifact_uri = 's3://bucket/' || run_uuid")
    db.close()
    with pytest.raises(Unsupported):
        SqliteRuns(tracker.uri).best_policy("exp")
    asked = []
    monkeypatch.setattr(TrackingStore, "best_policy", lambda self, *a: asked.append(a) or ({}, "x"))
    assert run_reader(tracker.uri).best_policy("exp") == ({}, "x")
    assert asked == [("exp", None, None)]


def test_history_survives_a_killed_search(tracker: Tracker) -> None:
    run_id = tracker.start_child(tracker.start_parent("p", {}), "random", 0, {})
    logger = tracker.logger(run_id, flush_every=50, flush_seconds=60)
    simulate(70, logger)  # the process "dies" here: 50 flushed, 20 still buffered
    store = TrackingStore(tracker.uri)
    history = store.history(run_id)
    assert [row["index"] for row in history] == list(range(1, 51))
    assert Record.from_dict(history[6]) == make_record(7)

    tracker.mark(run_id, "KILLED")  # flushes the rest, ends the run
    assert len(store.history(run_id)) == 70
    assert tracker.get_run(run_id).info.status == "KILLED"
    with pytest.raises(TrackingError, match="must be one of"):
        tracker.mark(run_id, "DONE")


# --------------------------------------------------------------------- a real server
def wait_until_healthy(uri: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()}")
            time.sleep(0.5)


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (SIGKILL after 10 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=10)
            return
        except ProcessLookupError:  # the group is already gone
            server.wait()
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` (sqlite backend, proxied artifacts, one worker, no job runner) on a free
    port of 127.0.0.1, in its own process group; stopped on the way out. Yields its URI."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    # fmt: off
    command = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder}/s.db",
               "--artifacts-destination", str(folder / "art"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    # fmt: on
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process
    log = folder / "server.log"
    with log.open("wb") as out:
        # Its own process group, so that stop() reaches the server and its uvicorn worker only.
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env=env,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server, log)
        yield uri
    finally:
        stop(server)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with running_mlflow_server(tmp_path) as uri:
        yield uri


@pytest.mark.slow
def test_cycle_through_a_tracking_server(mlflow_server: str) -> None:
    tracker = Tracker(mlflow_server, "served")
    parent = tracker.start_parent("p", CONFIG)
    child, _, policy = run_search(tracker, parent, "netadapt", n=60)
    tracker.mark(parent, "FINISHED")

    store = TrackingStore(mlflow_server)
    assert store.best_policy("served") == (policy.to_dict(), child)
    assert len(store.history(child)) == 60
    assert [r["run_id"] for r in store.child_runs(parent)] == [child]
