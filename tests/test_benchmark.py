"""The published benchmark (``autoprune bench``, :mod:`autoprune.bench`) on a tiny digits plan:
records, report, resume, estimate, bad plans, verdicts, latency timing and data checks."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import typer
import yaml
from typer.testing import CliRunner

from autoprune.bench import latency, report
from autoprune.bench import run as bench_run
from autoprune.bench.data import ensure_data
from autoprune.bench.estimate import UnitCosts, group_estimate
from autoprune.bench.plan import Narrowing, load_plan
from autoprune.cli.bench import bench_command
from autoprune.config import ConfigError
from autoprune.tracking.reader import TrackingStore

PLAN = {
    "experiment": "bench-test",
    "agent": "random",
    "searchers": ["random", "uniform", "global"],
    "budgets": ["flops=0.5"],
    "main_budget": "flops=0.5",
    "seeds": [7],
    "deterministic": ["uniform", "global"],
    "finetune_epochs": 1,
    "finetune_batches": 2,
    "task": {"data": {"name": "digits"}, "eval": {"latency_batch_size": 8}},
    "models": {"resnet20": {"evaluations": 3, "seeds": [0, 1]}},
    "extra": [
        {"model": "resnet20", "granularity": "fine", "criterion": "magnitude",
         "budget": "params=0.5", "searchers": ["random", "global"]},
    ],
}  # fmt: skip
CHANNEL, FINE = "resnet20/channel/flops=0.5", "resnet20/fine/params=0.5"


def _app() -> typer.Typer:
    """A throwaway app with the command registered as ``bench`` (the real app's registration
    is the CLI's)."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None: ...

    app.command("bench")(bench_command)
    return app


def _write(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _bench(tmp_path: Path, plan: Path, *more: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["bench", str(plan), "--out", str(tmp_path / "out"), "--workers", "0",
            "--tracking-uri", uri, *more]  # fmt: skip
    return CliRunner().invoke(_app(), args)


def _parents(tmp_path: Path) -> list:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench-test")
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("autoprune.kind") == "parent"]


def _records(tmp_path: Path) -> list[dict]:
    log = tmp_path / "out" / "benchmark_runs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    """Five timing rounds per pair instead of 20: a tiny model's latency, quickly."""
    monkeypatch.setattr(latency, "LATENCY_REPEATS", 5)


@pytest.fixture
def counted(monkeypatch):
    """Counts the experiments the benchmark runs (one per group)."""
    calls: list[str] = []
    real = bench_run.run_experiment

    def run_experiment(cfg, **kwargs):
        calls.append(cfg.search.budget)
        return real(cfg, **kwargs)

    monkeypatch.setattr(bench_run, "run_experiment", run_experiment)
    return calls


def test_tiny_benchmark_records_reports_and_resumes(tmp_path, monkeypatch, counted):
    import autoprune.apply

    monkeypatch.chdir(tmp_path)
    caps: list[int | None] = []
    real_fine_tune = autoprune.apply.fine_tune

    def fine_tune(*args, **kwargs):
        caps.append(kwargs.get("max_batches"))
        return real_fine_tune(*args, **kwargs)

    monkeypatch.setattr(autoprune.apply, "fine_tune", fine_tune)
    timings: list[tuple[list, int]] = []  # (models, searches finished so far) per timing
    real_time_models = latency.time_models
    finished = {"n": 0}
    real_finished = bench_run.BenchHooks.search_finished

    def counting_finished(self, outcome):
        finished["n"] += 1
        return real_finished(self, outcome)

    def spy(models, *args, **kwargs):
        timings.append((list(models), finished["n"]))
        return real_time_models(models, *args, **kwargs)

    monkeypatch.setattr(latency, "time_models", spy)
    monkeypatch.setattr(bench_run.BenchHooks, "search_finished", counting_finished)
    plan = _write(tmp_path, PLAN)
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmark_runs.jsonl").write_text('{"group": "an earlier run"}\n')
    done = _bench(tmp_path, plan)
    assert done.exit_code == 0, done.output
    # a new run keeps the earlier record aside
    (kept,) = out.glob("benchmark_runs.*.jsonl")
    assert kept.read_text() == '{"group": "an earlier run"}\n'
    groups = json.loads((out / "benchmark.json").read_text())
    assert [g["group"] for g in groups] == [CHANNEL, FINE] and len(counted) == 2
    assert groups == _records(tmp_path)  # the report's groups are the record's
    assert all(0.5 < g["dense_test_accuracy"] <= 1.0 and g["dense_latency_ms"] > 0 for g in groups)
    assert all("revision" in g for g in groups)  # the code each group ran (None outside git)
    assert groups[0]["command"].startswith(f"autoprune bench {plan} --workers 0 --out ")
    rows = [r for g in groups for r in g["rows"]]
    # the model's seeds (0, 1) replace the plan's (7); deterministic searchers once; global is
    # channel-only (left out of the fine group)
    assert sorted((r["granularity"], r["searcher"], r["seed"]) for r in rows) == [
        ("channel", "global", 0), ("channel", "random", 0), ("channel", "random", 1),
        ("channel", "uniform", 0), ("fine", "random", 0), ("fine", "random", 1),
    ]  # fmt: skip
    assert caps == [2] * len(rows)  # the same capped fine-tune for every best policy
    for r in rows:
        budget = 0.5 + 1e-6
        assert (r["flops_ratio"] if r["granularity"] == "channel" else r["params_ratio"]) <= budget
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy_finetuned"] <= 1.0
        assert r["latency_ms"] > 0 and r["wall_seconds"] > 0
        # each pruned model is timed in a pair with the dense model: the ratio is the pair's
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / r["dense_pair_ms"])
    episodic = [r for r in rows if r["searcher"] == "random"]
    assert all(r["evaluations"] == 3 and len(r["curve"]) == 3 for r in episodic)

    # every search's best policy is recorded (the same as its MLflow run's)
    store = TrackingStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for g in groups:
        assert g["latency_timing_version"] == latency.LATENCY_TIMING_VERSION
        assert g["latency_batch"] == 8
        for r in g["rows"]:
            assert r["ratios"] == pytest.approx(store.best_policy(run_id=r["run_id"])[0]["ratios"])
            assert r["latency_table_ratio"] is None  # FLOPs / params budgets: no table to ask
    # one pair per search, after all the group's searches: the dense model, then the pruned one
    assert [(len(models), n) for models, n in timings] == [(2, 4)] * 4 + [(2, 6)] * 2
    dense = timings[0][0][0]
    assert all(models[0] is dense for models, _ in timings[:4])

    md = (out / "benchmark.md").read_text()
    assert f"Latencies are timed {latency.LATENCY_TIMING}, nothing else running." in md
    assert "## resnet20" in md and "## Verdicts" in md and "capped at 2 batches" in md
    assert f"- {CHANNEL}: best `" in md
    assert "| flops=0.5 | channel | uniform |" in md and "1 (deterministic)" in md
    assert "| params=0.5 | fine | random |" in md
    for png in ("benchmark_frontier.png", "benchmark_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_parents(tmp_path)) == 2

    # resume: every group is recorded, nothing runs again, the report is rewritten
    (out / "benchmark.md").unlink()
    again = _bench(tmp_path, plan, "--resume")
    assert again.exit_code == 0, again.output
    assert len(counted) == 2 and len(_parents(tmp_path)) == 2
    assert "2 groups, 2 already done" in again.output
    assert _records(tmp_path) == groups
    assert "Partial" not in (out / "benchmark.md").read_text()
    monkeypatch.setattr(report, "plot_report", lambda *args: None)  # drawn and checked above
    _retime_and_report_only(tmp_path, plan, store, counted)


def _retime_and_report_only(tmp_path: Path, plan: Path, store, counted) -> None:
    """--retime-latency and --report-only on the records the tiny run made: nothing searched."""
    out = tmp_path / "out"
    log = out / "benchmark_runs.jsonl"
    # a group recorded the old way (timed beside the searches, its policies only in MLflow) is
    # timed again from its runs' policies; the other group is left alone
    first, second = _records(tmp_path)
    for name in ("latency_timing", "latency_timing_version", "latency_batch"):
        del first[name]
    for r in first["rows"]:
        del r["ratios"], r["latency_table_ratio"]
        r.update(latency_ms=1e6, latency_ratio=99.0)
    first["rows"][-1]["latency_ms"] = None  # a search that found no policy (no latency)
    log.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    assert _bench(tmp_path, plan, "--report-only").exit_code == 0
    md = (out / "benchmark.md").read_text()
    assert f"except: in {CHANNEL} each pruned model was timed as its search" in md
    retimed = _bench(tmp_path, plan, "--retime-latency")
    assert retimed.exit_code == 0, retimed.output
    assert f"{CHANNEL}: timing 3 pruned models with the dense one" in retimed.output
    assert f"{FINE}: already timed" in retimed.output
    again, same = _records(tmp_path)
    assert same == second and again["latency_timing_version"] == latency.LATENCY_TIMING_VERSION
    for r in again["rows"][:-1]:
        assert r["ratios"] == pytest.approx(store.best_policy(run_id=r["run_id"])[0]["ratios"])
        assert 0 < r["latency_ms"] < 1e5 and r["latency_table_ratio"] is None
    last = again["rows"][-1]
    assert last["ratios"] is None and last["latency_ms"] is None and last["latency_ratio"] is None
    assert "except:" not in (out / "benchmark.md").read_text()
    # a policy that is nowhere: the group stays as recorded, and the exit status says so
    del again["latency_timing_version"]
    del again["rows"][0]["ratios"]
    again["rows"][0]["run_id"] = "0" * 32
    log.write_text(json.dumps(again) + "\n" + json.dumps(second) + "\n")
    left = _bench(tmp_path, plan, "--retime-latency")
    assert left.exit_code == 1 and f"{CHANNEL}: left as recorded" in left.output
    assert _records(tmp_path) == [again, second]
    # a partial record (and a line torn by a kill): a partial report naming what is missing
    line = log.read_text().splitlines()[0]
    log.write_text(line + "\n" + line[: len(line) // 2])
    partial = _bench(tmp_path, plan, "--report-only")
    assert partial.exit_code == 0 and "1 of 2 groups" in partial.output
    assert "benchmark_runs.jsonl:2 is not a whole record" in partial.stderr
    md = (out / "benchmark.md").read_text()
    assert "Partial: 1 of 2 groups recorded" in md and FINE in md
    assert "| params=0.5 | fine |" not in md
    log.unlink()
    nothing = _bench(tmp_path, plan, "--report-only")
    assert nothing.exit_code != 0 and "no group of this plan is recorded" in str(nothing.exception)
    assert len(counted) == 2 and len(_parents(tmp_path)) == 2  # nothing was searched


def test_estimate_prints_a_time_and_records_nothing(tmp_path, monkeypatch, counted):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, PLAN)
    done = _bench(tmp_path, plan, "--estimate")
    assert done.exit_code == 0, done.output
    assert "**Estimated total: " in done.output and "hours** for 2 groups" in done.output
    assert f"| {CHANNEL} | 4 | 8 |" in done.output  # random 2 x 3, uniform and global 1 each
    assert f"| {FINE} | 2 | 6 |" in done.output
    assert not counted and not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_slice_runs_one_group_and_resume_runs_only_the_rest(tmp_path, monkeypatch, counted):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, {**PLAN, "budgets": ["flops=0.5", "flops=0.25"], "extra": []})
    one = _bench(tmp_path, plan, "--searchers", "uniform", "--slice", "resnet20", "flops<=0.25")
    assert one.exit_code == 0, one.output
    assert [g["group"] for g in _records(tmp_path)] == ["resnet20/channel/flops=0.25"]
    assert counted == ["flops<=0.25"]
    rest = _bench(tmp_path, plan, "--searchers", "uniform", "--resume")
    assert rest.exit_code == 0, rest.output
    assert counted == ["flops<=0.25", "flops<=0.5"]  # the recorded group did not run again
    assert [g["group"] for g in _records(tmp_path)] == [
        "resnet20/channel/flops=0.25", CHANNEL
    ]  # fmt: skip
    missing = _bench(tmp_path, plan, "--slice", "resnet20", "flops=0.3")
    assert isinstance(missing.exception, ConfigError) and "no such group" in str(missing.exception)


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"budgets": ["flops=0.5", "flops=abc"]}, "budgets.1", "flops=abc"),
        ({"main_budget": "speed=2"}, "main_budget", "unknown budget metric"),
        ({"searchers": ["uniform", "nosuch"]}, "searchers.1", "nosuch"),
        ({"models": {"resnet20": {"evaluations": 4, "speed": 2}}}, "models.resnet20.speed",
         "unknown key"),
        ({"extra": [{"model": "resnet20", "granularity": "fine", "budget": "params=2"}]},
         "extra.0.budget", "must be a ratio"),
        ({"extra": [{"model": "resnet20", "granularity": "coarse", "budget": "params=0.5"}]},
         "extra.0.granularity", "'channel', 'fine' or 'nm'"),
        ({"options": {"random": {"sigma": 0.3}}}, f"group {CHANNEL}", "sigma"),
        ({"extra": [{"model": "resnet20", "granularity": "fine", "criterion": "l2",
                     "budget": "params=0.5"}]},
         f"group {FINE}", "criterion 'l2' does not apply to 'fine'"),
    ],
)  # fmt: skip
def test_a_bad_plan_is_refused_naming_the_field(tmp_path, monkeypatch, change, path, message):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, {**PLAN, **change})
    with pytest.raises(ConfigError) as caught:
        load_plan(plan)
    text = str(caught.value)
    assert f"{path}: " in text and message in text and "\n" not in text
    refused = _bench(tmp_path, plan)  # the command: refused before any work
    assert isinstance(refused.exception, ConfigError) and str(refused.exception) == text
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("narrowing", "message"),
    [
        (Narrowing(models=["resnet99"]), "--models: ['resnet99'] not in the plan"),
        (Narrowing(budgets=["flops=abc"]), "--budgets: cannot read budget 'flops=abc'"),
        (Narrowing(granularities=["coarse"]), "--granularities: unknown ['coarse']"),
        (Narrowing(slice=("vgg11", "flops=0.5")), "--slice: ['vgg11'] not in the plan"),
    ],
)
def test_a_bad_narrowing_is_refused_naming_the_flag(tmp_path, narrowing, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_plan(_write(tmp_path, PLAN), narrowing)


def test_budgets_narrow_the_granularity_groups_and_models_set_seeds(tmp_path):
    path = _write(tmp_path, PLAN)
    narrowed = load_plan(path, Narrowing(budgets=["flops=0.5"]))
    assert [g.key for g in narrowed.groups] == [CHANNEL]
    both = load_plan(path, Narrowing(budgets=["flops=0.5", "params=0.5"]))
    assert [g.key for g in both.groups] == [CHANNEL, "resnet20/channel/params=0.5", FINE]
    cfg = both.config(both.groups[0], None)
    assert cfg.search.seeds == [0, 1]  # the model's seeds
    assert cfg.search.options["uniform"]["seeds"] == [0]  # deterministic: once
    assert cfg.search.options["random"]["evaluations"] == 3  # equal evaluations
    assert both.groups[2].searchers == ("random",)  # global is channel-only
    forced = load_plan(path, Narrowing(seeds=[3]))
    assert forced.config(forced.groups[0], None).search.seeds == [3]  # --seeds wins
    only = load_plan(path, Narrowing(granularities=["fine", "nm"]))
    assert [g.key for g in only.groups] == [FINE]  # no channel group added
    sensitivity = load_plan(_write(tmp_path, {**PLAN, "searchers": ["sensitivity", "random"]}))
    options = sensitivity.config(sensitivity.groups[0], None).search.options
    assert "evaluations" not in options.get("sensitivity", {})  # the scan sets its own count


def test_the_published_plans_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "experiments"
    plan = load_plan(root / "benchmark.yaml")
    assert len(plan.groups) == 18 and plan.main_budget == "flops=0.5"
    assert all(g.checkpoint and Path(g.checkpoint).is_file() for g in plan.groups)
    assert load_plan(root / "benchmark_digits.yaml").groups


def test_a_model_can_ship_its_checkpoint(tmp_path):
    """models.<name>.checkpoint (relative to the plan's folder) becomes every group's
    model.checkpoint; a missing file is refused when the plan is read."""
    plan = json.loads(json.dumps(PLAN))
    plan["models"]["resnet20"]["checkpoint"] = "weights/r20.pt"
    path = _write(tmp_path, plan)
    with pytest.raises(ConfigError, match=r"models\.resnet20\.checkpoint: .*r20\.pt not found"):
        load_plan(path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "r20.pt").write_bytes(b"")
    loaded = load_plan(path)
    for group in loaded.groups:  # the granularity groups too
        cfg = loaded.config(group, None)
        assert cfg.model.checkpoint == str(tmp_path / "weights" / "r20.pt")


def test_cost_estimate_counts_the_plans_searches_and_evaluations(tmp_path):
    """A group's estimate from given unit costs (made up here)."""
    plan = load_plan(_write(tmp_path, {**PLAN, "searchers": ["random", "sensitivity", "uniform",
                                                             "global", "netadapt"],
                                       "deterministic": ["sensitivity", "uniform", "global"],
                                       "options": {"sensitivity": {"grid": [0.4, 0.8]}}}),
                     Narrowing(workers=2))  # fmt: skip
    cost = UnitCosts("resnet20", "channel", units=10, build_s=1.0, evaluation_s=3.0,
                     test_s=5.0, finetune_s=20.0, finetune_batches=2, latency_table_s=None,
                     threads=1)  # fmt: skip
    channel, fine = (group_estimate(plan, g, cost) for g in plan.groups)
    # random x 2 seeds x 3 evaluations; sensitivity 10 units x 2 grid + 2; uniform and global
    # one each; netadapt left out
    assert channel.searches == 2 + 3
    assert channel.evaluations == 6 + 22 + 2
    assert channel.search_min == pytest.approx(30 * 3.0 / 2 / 60)
    assert channel.after_min == pytest.approx(5 * (2 * 5.0 + 20.0) / 60)
    assert plan.groups[1].searchers == ("random",)  # global and netadapt are channel-only
    assert fine.searches == 2 and fine.evaluations == 6
    assert fine.total_min == pytest.approx((6 * 3.0 / 2 + 2 * 30.0) / 60)


def test_resume_refuses_another_checkpoint_of_a_recorded_model(tmp_path, monkeypatch, counted):
    """Groups of one model are compared with each other: resuming on a retrained checkpoint
    (another machine) stops before any search, naming both checkpoints."""
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, {**PLAN, "budgets": ["flops=0.5", "flops=0.25"], "extra": []})
    first = _bench(tmp_path, plan, "--searchers", "uniform", "--stop-after", "0")
    assert first.exit_code == 0, first.output
    assert "1 groups left; go on with --resume" in first.output  # one group always runs
    assert "Partial: 1 of 2 groups recorded" in (tmp_path / "out" / "benchmark.md").read_text()
    (group,) = _records(tmp_path)
    assert group["group"] == CHANNEL and len(group["checkpoint"]) == 16  # the model's digest
    # records of another checkpoint: refused before any search of the new group
    group["checkpoint"] = "0123456789abcdef"
    log = tmp_path / "out" / "benchmark_runs.jsonl"
    log.write_text(json.dumps(group) + "\n")
    refused = _bench(tmp_path, plan, "--searchers", "uniform", "--resume")
    assert isinstance(refused.exception, bench_run.CheckpointMismatch)
    message = str(refused.exception)
    assert "measured on checkpoint 0123456789abcdef" in message
    assert "rerun without --resume" in message and len(_records(tmp_path)) == 1
    # records from before the digest was kept: the dense test accuracy tells them apart
    del group["checkpoint"]
    group["dense_test_accuracy"] = 0.5
    log.write_text(json.dumps(group) + "\n")
    refused = _bench(tmp_path, plan, "--searchers", "uniform", "--resume")
    assert "test accuracy 0.5" in str(refused.exception)
    assert len(counted) == 3  # the refused groups' experiments stopped at their task


def _rows(group: str, values: dict[str, list[float]]) -> list[dict]:
    return [
        {"group": group, "searcher": name, "seed": i, "test_accuracy": v}
        for name, vs in values.items()
        for i, v in enumerate(vs)
    ]


@pytest.mark.parametrize(
    ("values", "best", "wins"),
    [
        # a lead larger than both spreads: a win
        ({"ddpg": [0.80, 0.82], "random": [0.78, 0.80], "uniform": [0.5]}, "ddpg", True),
        # best on the mean, but the lead (2 points) is inside ddpg's spread (4.2): not a win
        ({"ddpg": [0.78, 0.84], "random": [0.79, 0.79]}, "ddpg", False),
        # ... or inside the rival's spread
        ({"ddpg": [0.81, 0.81], "evolution": [0.75, 0.83]}, "ddpg", False),
        # ahead with one seed: nothing to measure the spread with, not a win
        ({"ddpg": [0.90], "random": [0.70, 0.71]}, "ddpg", False),
        # behind: the other searcher is best
        ({"ddpg": [0.70, 0.71], "evolution": [0.80, 0.81]}, "evolution", False),
    ],
)
def test_verdict_on_made_up_results(values, best, wins):
    rows = _rows("m/channel/flops=0.5", values)
    v = report.group_verdict(rows, "m/channel/flops=0.5", "test_accuracy", "ddpg")
    assert v is not None and v["best"] == best and v["agent_wins"] is wins
    others = [sum(vs) / len(vs) for n, vs in values.items() if n != "ddpg"]
    mine = sum(values["ddpg"]) / len(values["ddpg"])
    assert v["lead"] == pytest.approx(mine - max(others))
    line = report.verdict_line(v)
    assert ("**`ddpg` wins**" in line) is wins and ("not a win" in line) is (not wins)
    text = "\n".join(report.verdicts(rows, ["m/channel/flops=0.5"], "ddpg"))
    assert f"`ddpg` wins {int(wins)} of 1 groups" in text


def test_verdict_without_the_agent_or_the_column():
    rows = _rows("g", {"random": [0.5, 0.6], "uniform": [0.4]})
    v = report.group_verdict(rows, "g", "test_accuracy", "ddpg")
    assert v is not None and v["best"] == "random" and not v["agent_wins"]
    assert "no `ddpg` rows" in report.verdict_line(v)
    assert report.group_verdict(rows, "g", "test_accuracy_finetuned") is None


def test_the_report_names_the_code_revisions_of_its_groups():
    assert report.revisions_note([{"group": "a"}]) == ""  # records that predate revisions
    one = [{"group": "a", "revision": "abc1234"}, {"group": "b", "revision": "abc1234"}]
    assert report.revisions_note(one) == " Code: revision abc1234."
    two = [*one, {"group": "c", "revision": "def5678+dirty"}]
    assert report.revisions_note(two) == " Code: abc1234 (a, b); def5678+dirty (c)."
    older = [*one, {"group": "d"}]  # a record from before revisions were kept
    assert report.revisions_note(older) == " Code: abc1234 (a, b); not recorded (d)."


def test_latency_note_names_groups_timed_the_old_ways():
    now = {"group": "m/channel/flops=0.5", "latency_timing_version": latency.LATENCY_TIMING_VERSION}
    beside = {"group": "m/channel/flops=0.25"}  # timed as each search ended
    cold = {"group": "m/channel/params=0.3", "latency_timing_version": 2}  # one pass per round
    assert (
        report.latency_note([now])
        == f" Latencies are timed {latency.LATENCY_TIMING}, nothing else running."
    )
    note = report.latency_note([now, beside, cold])
    assert "in m/channel/flops=0.25 each pruned model was timed as its search ended" in note
    assert "in m/channel/params=0.3 all the group's models were timed together" in note
    assert "flops=0.5" not in note.split("except")[1]


def test_table_latency_ratios_are_the_tables_prediction_for_the_pruned_models(default_task):
    """The report's table latency ratio of a policy is what the lookup table predicts for the
    model that policy prunes to (read from its layers), over the dense prediction; only for a
    latency budget."""
    import numpy as np

    task = default_task
    rng = np.random.default_rng(0)
    policies = [task.ratios_dict(rng.uniform(0.0, 0.6, len(task.units))) for _ in range(2)]
    got = latency.table_ratios(task, "latency=0.6", policies)
    table = task.latency_table
    for policy, ratio in zip(policies, got, strict=True):
        expected = table.predict_model(task.prune(policy)) / table.predict({})
        assert ratio == pytest.approx(expected, rel=1e-6) and ratio < 1.0
    assert latency.table_ratios(task, "flops=0.5", policies) == [None, None]


def _idx_plan(tmp_path: Path, path: str | None) -> Path:
    data = {"name": "fashion_mnist", **({"path": path} if path else {})}
    return _write(tmp_path, {**PLAN, "task": {"data": data}})


def test_missing_fashion_mnist_stops_before_any_work(tmp_path, monkeypatch):
    import os

    from autoprune.data import idx

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # a folder given in the plan: named, nothing installed
    plan = load_plan(_idx_plan(tmp_path, str(tmp_path / "nowhere")))
    with pytest.raises(bench_run.BenchError, match="fashion_mnist folder") as caught:
        bench_run.run_benchmark(plan, out)
    assert "nowhere" in str(caught.value) and "\n" not in str(caught.value)
    # the default folder, not root: says what to install
    monkeypatch.setattr(idx, "FASHION_MNIST_FOLDER", tmp_path / "absent")
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    plan = load_plan(_idx_plan(tmp_path, None))
    with pytest.raises(bench_run.BenchError) as caught:
        bench_run.run_benchmark(plan, out)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message and "run as root" in message
    assert "\n" not in message
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_fashion_mnist_installed_with_apt_when_root(tmp_path, monkeypatch):
    import os
    import shutil
    import subprocess

    from autoprune.data import idx

    folder = tmp_path / "fmnist"
    monkeypatch.setattr(idx, "FASHION_MNIST_FOLDER", folder)
    monkeypatch.setattr(os, "geteuid", lambda: 0, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    calls: list[list[str]] = []

    def run(cmd, **kwargs):  # the package manager, faked: the second install works
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "install"] and len(calls) == 3:
            folder.mkdir()
            for pair in idx.FILES.values():
                for stem in pair:
                    (folder / (stem + ".gz")).write_bytes(b"")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] == "install" else 0, "", "E: no")

    monkeypatch.setattr(subprocess, "run", run)
    plan = load_plan(_idx_plan(tmp_path, None))
    assert ensure_data(plan) is None
    assert [c[:2] for c in calls] == [["apt-get", "install"], ["apt-get", "update"],
                                      ["apt-get", "install"]]  # fmt: skip
    assert "dataset-fashion-mnist" in calls[0]
    # and a failure is one line naming what failed
    shutil.rmtree(folder)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", "E: Unable to locate package dataset-fashion-mnist"))  # fmt: skip
    problem = ensure_data(plan)
    assert problem is not None and "apt-get install dataset-fashion-mnist failed" in problem
    assert "Unable to locate package" in problem and "\n" not in problem
