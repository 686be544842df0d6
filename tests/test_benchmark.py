"""experiments/benchmark.py on a tiny plan: tables, plots, MLflow runs, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module():
    path = ROOT / "experiments" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bench = _module()

PLAN = {
    "experiment": "bench-test",
    "searchers": ["uniform", "random", "global"],
    "budgets": ["flops=0.5"],
    "seeds": [0, 1],
    "deterministic": ["uniform", "global"],
    "finetune_epochs": 1,
    "task": {"data": {"name": "digits"}, "eval": {"latency_batch_size": 8}},
    "options": {},
    "models": {"resnet20": {"evaluations": 4}},
    "extra": [
        {"model": "resnet20", "granularity": "fine", "criterion": "magnitude",
         "budget": "params=0.5", "searchers": ["random", "global"]},
    ],
}  # fmt: skip


def _write(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _args(tmp_path: Path, plan: Path, *more: str) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ["--plan", str(plan), "--out", str(tmp_path / "out"), "--workers", "0",
            "--tracking-uri", uri, *more]  # fmt: skip


def _parents(tmp_path: Path) -> list:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench-test")
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("autoprune.kind") == "parent"]


def test_tiny_benchmark_tables_plots_runs_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, PLAN)
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmark_runs.jsonl").write_text('{"group": "an earlier run"}\n')
    assert bench.main(_args(tmp_path, plan)) == 0
    # a new run keeps the earlier record aside
    (kept,) = out.glob("benchmark_runs.*.jsonl")
    assert kept.read_text() == '{"group": "an earlier run"}\n'
    groups = json.loads((out / "benchmark.json").read_text())
    assert [g["group"] for g in groups] == [
        "resnet20/channel/flops=0.5", "resnet20/fine/params=0.5"
    ]  # fmt: skip
    assert all(0.5 < g["dense_test_accuracy"] <= 1.0 and g["dense_latency_ms"] > 0 for g in groups)
    rows = [r for g in groups for r in g["rows"]]
    # deterministic searchers once, the others once per seed; global is channel-only (left out)
    assert sorted((r["group"].split("/")[1], r["searcher"], r["seed"]) for r in rows) == [
        ("channel", "global", 0), ("channel", "random", 0), ("channel", "random", 1),
        ("channel", "uniform", 0), ("fine", "random", 0), ("fine", "random", 1),
    ]  # fmt: skip
    for r in rows:
        budget = 0.5 + 1e-6
        assert (r["flops_ratio"] if r["granularity"] == "channel" else r["params_ratio"]) <= budget
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy_finetuned"] <= 1.0
        assert r["latency_ms"] > 0 and r["latency_ratio"] > 0
        assert r["wall_seconds"] > 0
    random_rows = [r for r in rows if r["searcher"] == "random"]
    assert all(r["evaluations"] == 4 and len(r["curve"]) == 4 for r in random_rows)
    # the latency ratio is the pruned model's measured latency over the dense model's (measured
    # once per group); not asserted < 1: odd channel counts can be slower than dense ones
    for g in groups:
        for r in g["rows"]:
            assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / g["dense_latency_ms"])

    md = (out / "benchmark.md").read_text()
    assert "## resnet20" in md and "## Targets" in md
    assert "| flops=0.5 | channel | uniform |" in md and "1 (deterministic)" in md
    assert "| params=0.5 | fine | random |" in md
    for png in ("benchmark_frontier.png", "benchmark_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parents = _parents(tmp_path)
    assert len(parents) == 2

    # resume: every group is recorded, nothing runs again, the report is rewritten
    (out / "benchmark.md").unlink()
    assert bench.main(_args(tmp_path, plan, "--resume")) == 0
    assert len(_parents(tmp_path)) == 2
    assert (out / "benchmark.md").is_file()
    assert "2 groups, 2 already done" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        ({"searchers": ["uniform", "nosuch"]}, (), "nosuch"),
        ({"budgets": ["flops=abc"]}, (), "flops=abc"),
        ({"colour": "blue"}, (), "unknown key"),
        ({}, ("--models", "resnet99"), "resnet99"),
        ({"models": {"resnet20": {"evaluations": 4, "speed": 2}}}, (), "speed"),
        ({"options": {"random": {"sigma": 0.3}}}, (), "sigma"),
        (
            {"extra": [{"model": "resnet20", "granularity": "fine", "budget": "params=0.5"}]},
            (),
            "criterion 'l2' does not apply to 'fine'",
        ),
    ],
)
def test_bad_plan_fails_before_any_work(tmp_path, monkeypatch, capsys, change, args, message):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, {**PLAN, **change})
    assert bench.main(_args(tmp_path, plan, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
