"""Accuracy-vs-budget sweeps: ``run_sweep`` in-process (one MLflow parent run per budget, rows,
frontier, plot), budgets refused before any work, and ``autoprune sweep`` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoprune.cli import app
from autoprune.config import ConfigError
from autoprune.frontier import frontier_points
from autoprune.plots import plot_frontier
from autoprune.runner.config import experiment_config
from autoprune.runner.sweep import run_sweep, split_budgets
from autoprune.tracking.reader import TrackingStore

BIN = Path(sys.executable).parent
PNG = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path: Path, searchers: str = "[uniform,random]", seeds: str = "[0,1]"):
    return experiment_config(
        overrides=[
            f"search.searchers={searchers}", f"search.seeds={seeds}", "search.evaluations=6",
            "search.workers=0", "tracking.experiment=S", "threads=1",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )  # fmt: skip


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(
        [str(BIN / "autoprune"), *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=180,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_sweep_rows_frontier_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    sweep = run_sweep(_config(tmp_path), ["flops=0.6", "flops=0.35"])

    store = TrackingStore(f"sqlite:///{tmp_path}/mlflow.db")
    parents = [r for r in store.list_runs("S") if r["kind"] == "parent"]
    assert sorted(r["run_id"] for r in parents) == sorted(r.parent_id for r in sweep.results)
    assert len(parents) == 2
    tags = store.get_run(sweep.results[1].parent_id).data.tags
    assert tags["autoprune.budget"] == "flops<=0.35"
    assert tags["autoprune.sweep"] == "flops<=0.6; flops<=0.35"

    keys = [(r["budget"], r["searcher"], r["seed"]) for r in sweep.rows]
    assert keys == [
        (b, s, seed)
        for b in ("flops<=0.6", "flops<=0.35")
        for s in ("uniform", "random")
        for seed in (0, 1)
    ]
    for r in sweep.rows:
        assert r["flops_ratio"] <= float(r["budget"].split("<=")[1]) + 1e-6, r
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert {r["evaluations"] for r in sweep.rows if r["searcher"] == "random"} == {6.0}

    frontier = sweep.frontier()
    assert set(frontier) == {"uniform", "random"}
    for points in frontier.values():
        assert [p["budget"] for p in points] == ["flops<=0.35", "flops<=0.6"]  # by cost
        assert points[0]["cost"] < points[1]["cost"]
        assert all(p["n"] == 2 for p in points)
        assert set(points[0]) == {"budget", "cost", "cost_std", "accuracy", "accuracy_std", "n"}
    # uniform is deterministic: both seeds give the same policy
    assert all(p["accuracy_std"] == 0.0 for p in frontier["uniform"])

    fig = plot_frontier(sweep.rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["uniform", "random"]
    assert len(ax.collections) >= 2  # the seeds' scatter (plus the error bars)


def test_frontier_from_plain_rows_into_a_given_axes():
    """Another script's rows: only searcher, budget, cost and accuracy; None values skipped."""
    from matplotlib.figure import Figure

    rows = [
        {"searcher": "a", "budget": "flops=0.5", "flops_ratio": 0.5, "test_accuracy": 0.9},
        {"searcher": "a", "budget": "flops=0.5", "flops_ratio": 0.4, "test_accuracy": 0.8},
        {"searcher": "a", "budget": "flops=0.25", "flops_ratio": 0.2, "test_accuracy": 0.7},
        {"searcher": "a", "budget": "flops=0.25", "flops_ratio": None, "test_accuracy": 0.1},
        {"searcher": "b", "budget": "flops=0.5", "flops_ratio": 0.5, "test_accuracy": None},
    ]
    points = frontier_points(rows)
    assert list(points) == ["a"]
    low, high = points["a"]
    assert (low["budget"], low["n"], low["accuracy"], low["cost_std"]) == ("flops=0.25", 1, 0.7, 0)
    assert high["cost"] == pytest.approx(0.45) and high["accuracy"] == pytest.approx(0.85)
    assert high["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert plot_frontier(rows, title="left", ax=axes[0]) is fig
    assert axes[0].get_title() == "left"
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["a"]
    assert plot_frontier([], ax=axes[1]) is fig  # nothing to draw is not an error


@pytest.mark.parametrize("bad", ["flops=abc", "flops=1.5"])
def test_malformed_budget_refused_before_any_work(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"sweep budget 2 of 2") as caught:
        run_sweep(_config(tmp_path), ["flops=0.5", bad])
    assert bad in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / ".autoprune").exists()


def test_unreachable_budget_refused_before_the_first_run(tmp_path, monkeypatch):
    """Checked once the task is built, before the first parent run starts."""
    from autoprune.budget import BudgetError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BudgetError, match=r"flops<=0\.01 is unreachable"):
        run_sweep(_config(tmp_path), ["flops=0.6", "flops=0.01"])
    assert TrackingStore(f"sqlite:///{tmp_path}/mlflow.db").list_runs("S") == []


def test_split_budgets_shorthand():
    assert split_budgets("flops=0.75,0.5, 0.25") == ["flops=0.75", "flops=0.5", "flops=0.25"]
    assert split_budgets("flops=0.5,params=0.5,0.25") == ["flops=0.5", "params=0.5", "params=0.25"]
    assert split_budgets("flops=0.5+params=0.6") == ["flops=0.5,params=0.6"]
    for bad in ("0.5,flops=0.25", "flops=0.5+params=0.6,0.4", " , "):
        with pytest.raises(ConfigError):
            split_budgets(bad)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sweep_command(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _cli(
        "sweep", "--budgets", "flops=0.6,0.35", "--searchers", "uniform", "--seeds", "0",
        "--plot", "out.png", "--csv", "rows.csv", "--tracking-uri", uri, "--experiment", "W",
        "threads=1", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr}"
    assert "Traceback" not in run.stderr
    assert "flops<=0.6" in run.stdout and "flops<=0.35" in run.stdout
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 3  # header + 2 budgets
    store = TrackingStore(uri)
    parents = [r for r in store.list_runs("W") if r["kind"] == "parent"]  # oldest first
    assert len(parents) == 2
    logged = {a.path for a in store.client.list_artifacts(parents[-1]["run_id"])}
    assert {"sweep.png", "sweep.csv"} <= logged

    bad = _cli("sweep", "--budgets", "flops=x", "--tracking-uri", uri, cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: ") and "flops=x" in lines[0]


def test_sweep_help_has_an_example():
    result = CliRunner().invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "autoprune sweep" in result.output
