"""experiments/benchmark.py on a tiny plan: tables, plots, MLflow runs, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from experiment_scripts import load

from autoprune.tracking.tracker import TrackingStore

bench = load("benchmark")

SEARCHERS = ["ddpg", "evolution", "random", "netadapt", "sensitivity", "uniform", "global"]
PLAN = {
    "experiment": "bench-test",
    "agent": "ddpg",
    "searchers": SEARCHERS,
    "budgets": ["flops=0.5"],
    "main_budget": "flops=0.5",
    "seeds": [7],
    "deterministic": ["sensitivity", "uniform", "global"],
    "finetune_epochs": 1,
    "finetune_batches": 3,
    "task": {"data": {"name": "digits"}, "eval": {"latency_batch_size": 8}},
    "options": {
        "ddpg": {"warmup_episodes": 2},
        "evolution": {"population": 3, "parents": 2},
        "netadapt": {"r0": 0.1, "finetune_batches": 2, "seeds": [0]},
        "sensitivity": {"grid": [0.4, 0.8]},
        "global": {"bisection_steps": 6},
    },
    "models": {"resnet20": {"evaluations": 4, "seeds": [0, 1]}},
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
    import autoprune.apply

    monkeypatch.chdir(tmp_path)
    caps: list[int | None] = []
    real_fine_tune = autoprune.apply.fine_tune

    def fine_tune(*args, **kwargs):
        caps.append(kwargs.get("max_batches"))
        return real_fine_tune(*args, **kwargs)

    monkeypatch.setattr(autoprune.apply, "fine_tune", fine_tune)
    timings: list[tuple[list, int]] = []  # (models, searches finished so far) per timing
    real_time_models = bench.time_models
    finished = {"n": 0}
    real_finished = bench.BenchHooks.search_finished

    def counting_finished(self, outcome):
        finished["n"] += 1
        return real_finished(self, outcome)

    def spy(models, *args, **kwargs):
        timings.append((list(models), finished["n"]))
        return real_time_models(models, *args, **kwargs)

    monkeypatch.setattr(bench, "time_models", spy)
    monkeypatch.setattr(bench.BenchHooks, "search_finished", counting_finished)
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
    assert all("revision" in g for g in groups)  # the code each group ran (None outside git)
    rows = [r for g in groups for r in g["rows"]]
    # every searcher ran; the model's seeds (0, 1) replace the plan's (7); deterministic searchers
    # and netadapt (seeds: [0] in its options) once; global is channel-only (left out of fine)
    assert sorted((r["group"].split("/")[1], r["searcher"], r["seed"]) for r in rows) == sorted([
        ("channel", "ddpg", 0), ("channel", "ddpg", 1), ("channel", "evolution", 0),
        ("channel", "evolution", 1), ("channel", "random", 0), ("channel", "random", 1),
        ("channel", "netadapt", 0), ("channel", "sensitivity", 0), ("channel", "uniform", 0),
        ("channel", "global", 0), ("fine", "random", 0), ("fine", "random", 1),
    ])  # fmt: skip
    # the same capped fine-tune for every best policy (netadapt's own short fine-tunes: 2)
    assert caps.count(3) == len(rows) and set(caps) <= {2, 3}
    for r in rows:
        budget = 0.5 + 1e-6
        assert (r["flops_ratio"] if r["granularity"] == "channel" else r["params_ratio"]) <= budget
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy_finetuned"] <= 1.0
        assert r["latency_ms"] > 0 and r["latency_ratio"] > 0
        assert r["wall_seconds"] > 0
    episodic = [r for r in rows if r["searcher"] in ("random", "ddpg", "evolution")]
    assert all(r["evaluations"] == 4 and len(r["curve"]) == 4 for r in episodic)
    # the latency ratio is the pruned model's measured latency over the dense model's (measured
    # once per group); not asserted < 1: odd channel counts can be slower than dense ones
    for g in groups:
        for r in g["rows"]:
            # each pruned model is timed in a pair with the dense model: the ratio is the pair's
            assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / r["dense_pair_ms"])

    # every search's best policy is recorded (the same as its MLflow run's) and its pruned
    # model timed with the dense one after the searches
    store = TrackingStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for g in groups:
        assert g["latency_timing_version"] == bench.LATENCY_TIMING_VERSION
        assert g["latency_batch"] == 8
        for r in g["rows"]:
            assert r["ratios"] == pytest.approx(store.best_policy(run_id=r["run_id"])[0]["ratios"])
            assert r["latency_table_ratio"] is None  # FLOPs / params budgets: no table to ask

    # one pair per search, after all the group's searches: the dense model, then the search's
    # pruned model (none kept the dense model: the budget cuts)
    assert [(len(models), done) for models, done in timings] == [(2, 10)] * 10 + [(2, 12)] * 2

    def size(model):
        return sum(p.numel() for p in model.parameters())

    dense = timings[0][0][0]
    assert all(models[0] is dense for models, _ in timings[:10])
    assert all(size(models[1]) < size(dense) for models, _ in timings[:10])  # channel: smaller

    md = (out / "benchmark.md").read_text()
    assert f"Latencies are timed {bench.LATENCY_TIMING}, nothing else running." in md
    assert "## resnet20" in md and "## Verdicts" in md
    assert "- resnet20/channel/flops=0.5: best `" in md and "capped at 3 batches" in md
    assert "| ddpg | -" not in md  # the main table has the main budget's numbers
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
    assert "Partial" not in (out / "benchmark.md").read_text()

    # --retime-latency: a group recorded the old way (timed beside the searches, its policies
    # only in MLflow) is timed again from its runs' policies; the other group is left alone
    log = out / "benchmark_runs.jsonl"
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    for field in ("latency_timing", "latency_timing_version", "latency_batch"):
        del first[field]
    for r in first["rows"]:
        del r["ratios"], r["latency_table_ratio"]
        r.update(latency_ms=1e6, latency_ratio=99.0)
    first["rows"][-1]["latency_ms"] = None  # a search that found no policy (no latency)
    log.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    assert bench.main(_args(tmp_path, plan, "--report-only")) == 0
    assert (
        "except: in resnet20/channel/flops=0.5 each pruned model was timed as its search"
        in (out / "benchmark.md").read_text()
    )
    capsys.readouterr()
    assert bench.main(_args(tmp_path, plan, "--retime-latency")) == 0
    printed = capsys.readouterr().out
    assert "resnet20/channel/flops=0.5: timing 9 pruned models with the dense one" in printed
    assert "resnet20/fine/params=0.5: already timed" in printed
    again, same = (json.loads(line) for line in log.read_text().splitlines())
    assert same == second and again["latency_timing_version"] == bench.LATENCY_TIMING_VERSION
    assert again["latency_batch"] == 8
    for r in again["rows"][:-1]:
        assert r["ratios"] == pytest.approx(store.best_policy(run_id=r["run_id"])[0]["ratios"])
        assert 0 < r["latency_ms"] < 1e5 and r["latency_table_ratio"] is None
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / r["dense_pair_ms"])
    last = again["rows"][-1]
    assert last["ratios"] is None and last["latency_ms"] is None and last["latency_ratio"] is None
    assert "except:" not in (out / "benchmark.md").read_text()
    assert len(_parents(tmp_path)) == 2  # nothing was searched
    # a policy that is nowhere: the group stays as recorded, and the exit status says so
    del again["latency_timing_version"]
    del again["rows"][0]["ratios"]
    again["rows"][0]["run_id"] = "0" * 32
    log.write_text(json.dumps(again) + "\n" + json.dumps(second) + "\n")
    assert bench.main(_args(tmp_path, plan, "--retime-latency")) == 1
    assert "resnet20/channel/flops=0.5: left as recorded" in capsys.readouterr().out
    assert [json.loads(line) for line in log.read_text().splitlines()] == [again, second]

    # --report-only: a partial record, a partial report naming what is missing; nothing runs
    log = out / "benchmark_runs.jsonl"
    first = log.read_text().splitlines()[0]
    log.write_text(first + "\n" + first[: len(first) // 2])  # and a line torn by a kill
    assert bench.main(_args(tmp_path, plan, "--report-only")) == 0
    assert "benchmark_runs.jsonl:2 is not a whole record" in capsys.readouterr().err
    assert len(_parents(tmp_path)) == 2
    md = (out / "benchmark.md").read_text()
    assert "Partial: 1 of 2 groups recorded" in md and "resnet20/fine/params=0.5" in md
    assert "| params=0.5 | fine |" not in md
    log.unlink()
    assert bench.main(_args(tmp_path, plan, "--report-only")) == 2
    assert "no group of this plan is recorded" in capsys.readouterr().err


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
            {
                "extra": [
                    {
                        "model": "resnet20",
                        "granularity": "fine",
                        "criterion": "l2",
                        "budget": "params=0.5",
                    }
                ]
            },
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
    v = bench.group_verdict(rows, "m/channel/flops=0.5", "test_accuracy", "ddpg")
    assert v is not None and v["best"] == best and v["agent_wins"] is wins
    others = [sum(vs) / len(vs) for n, vs in values.items() if n != "ddpg"]
    mine = sum(values["ddpg"]) / len(values["ddpg"])
    assert v["lead"] == pytest.approx(mine - max(others))
    line = bench.verdict_line(v)
    assert ("**`ddpg` wins**" in line) is wins and ("not a win" in line) is (not wins)
    text = "\n".join(bench.verdicts(rows, ["m/channel/flops=0.5"], "ddpg"))
    assert f"`ddpg` wins {int(wins)} of 1 groups" in text


def test_verdict_without_the_agent_or_the_column():
    rows = _rows("g", {"random": [0.5, 0.6], "uniform": [0.4]})
    v = bench.group_verdict(rows, "g", "test_accuracy", "ddpg")
    assert v is not None and v["best"] == "random" and not v["agent_wins"]
    assert "no `ddpg` rows" in bench.verdict_line(v)
    assert bench.group_verdict(rows, "g", "test_accuracy_finetuned") is None


def _idx_plan(tmp_path: Path, path: str | None) -> Path:
    data = {"name": "fashion_mnist", **({"path": path} if path else {})}
    return _write(tmp_path, {**PLAN, "task": {"data": data}})


def test_missing_fashion_mnist_stops_before_any_work(tmp_path, monkeypatch, capsys):
    from autoprune.data import idx

    monkeypatch.chdir(tmp_path)
    # a folder given in the plan: named, nothing installed
    assert bench.main(_args(tmp_path, _idx_plan(tmp_path, str(tmp_path / "nowhere")))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fashion_mnist folder") and "nowhere" in err and "\n" not in err
    # the default folder, not root: says what to install
    monkeypatch.setattr(idx, "FASHION_MNIST_FOLDER", tmp_path / "absent")
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000, raising=False)
    assert bench.main(_args(tmp_path, _idx_plan(tmp_path, None))) == 2
    err = capsys.readouterr().err.strip()
    assert "apt-get install dataset-fashion-mnist" in err and "run as root" in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_fashion_mnist_installed_with_apt_when_root(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from autoprune.data import idx

    folder = tmp_path / "fmnist"
    monkeypatch.setattr(idx, "FASHION_MNIST_FOLDER", folder)
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0, raising=False)
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
    plan = bench.load_plan(_idx_plan(tmp_path, None), bench.parse_args([]))
    assert bench.ensure_data(plan) is None
    assert [c[:2] for c in calls] == [["apt-get", "install"], ["apt-get", "update"],
                                      ["apt-get", "install"]]  # fmt: skip
    assert "dataset-fashion-mnist" in calls[0]
    # and a failure is one line naming what failed
    shutil.rmtree(folder)
    calls.clear()
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", "E: Unable to locate package dataset-fashion-mnist"))  # fmt: skip
    problem = bench.ensure_data(plan)
    assert problem is not None and "apt-get install dataset-fashion-mnist failed" in problem
    assert "Unable to locate package" in problem and "\n" not in problem


def test_budgets_narrow_the_granularity_groups_and_models_set_seeds(tmp_path):
    plan_path = _write(tmp_path, PLAN)
    narrowed = bench.load_plan(plan_path, bench.parse_args(["--budgets", "flops=0.5"]))
    assert [g.key for g in narrowed.groups] == ["resnet20/channel/flops=0.5"]
    both = bench.load_plan(plan_path, bench.parse_args(["--budgets", "flops=0.5,params=0.5"]))
    assert [g.key for g in both.groups] == [
        "resnet20/channel/flops=0.5", "resnet20/channel/params=0.5", "resnet20/fine/params=0.5"
    ]  # fmt: skip
    cfg = both.config(both.groups[0], None)
    assert cfg.search.seeds == [0, 1]  # the model's seeds
    assert cfg.search.options["uniform"]["seeds"] == [0]  # deterministic: once
    assert cfg.search.options["ddpg"]["evaluations"] == 4  # equal evaluations ...
    assert "evaluations" not in cfg.search.options["sensitivity"]  # ... but not for the scan
    forced = bench.load_plan(plan_path, bench.parse_args(["--seeds", "3"]))
    assert forced.config(forced.groups[0], None).search.seeds == [3]  # --seeds wins
    only = bench.load_plan(plan_path, bench.parse_args(["--granularities", "fine,nm"]))
    assert [g.key for g in only.groups] == ["resnet20/fine/params=0.5"]  # no channel group added
    with pytest.raises(bench.ConfigError, match=r"unknown \['coarse'\]"):
        bench.load_plan(plan_path, bench.parse_args(["--granularities", "coarse"]))


def test_cost_estimate_counts_the_plans_searches_and_evaluations(tmp_path):
    """experiments/bench_costs.py: a group's estimate from given unit costs (made up here)."""
    costs_mod = load("bench_costs")
    plan = bench.load_plan(_write(tmp_path, PLAN), bench.parse_args(["--workers", "2"]))
    cost = {"units": 10, "evaluation_s": 3.0, "test_s": 5.0, "finetune_s": 20.0,
            "latency_table_s": None}  # fmt: skip
    channel, fine = (costs_mod.group_estimate(plan, g, cost) for g in plan.groups)
    # ddpg, evolution, random x 2 seeds x 4 evaluations; sensitivity 10 units x 2 grid + 2;
    # uniform and global one each; netadapt left out
    assert channel["searches"] == 6 + 3
    assert channel["evaluations"] == 24 + 22 + 2
    assert channel["search_min"] == pytest.approx(48 * 3.0 / 2 / 60)
    assert channel["after_min"] == pytest.approx(9 * (2 * 5.0 + 20.0) / 60)
    assert plan.groups[1].searchers == ("random",)  # global is channel-only
    assert fine["searches"] == 2 and fine["evaluations"] == 8
    assert fine["total_min"] == pytest.approx((8 * 3.0 / 2 + 2 * 30.0) / 60)


def test_resume_refuses_another_checkpoint_of_a_recorded_model(tmp_path, monkeypatch, capsys):
    """Groups of one model are compared with each other: resuming on a retrained checkpoint
    (another machine) stops before any search, naming both checkpoints."""
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, PLAN)
    first = _args(tmp_path, plan, "--budgets", "flops=0.5", "--searchers", "uniform")
    assert bench.main(first) == 0
    log = tmp_path / "out" / "benchmark_runs.jsonl"
    (group,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(group["checkpoint"]) == 16  # the digest of the model the group measured
    # the same checkpoint: a new group of that model runs on resume
    more = _args(tmp_path, plan, "--budgets", "flops=0.5,flops=0.25", "--searchers", "uniform")
    assert bench.main([*more, "--resume"]) == 0
    assert len(log.read_text().splitlines()) == 2
    # records of another checkpoint: refused before any search of the new group
    records = [json.loads(line) for line in log.read_text().splitlines()][:1]
    records[0]["checkpoint"] = "0123456789abcdef"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert bench.main([*more, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "measured on checkpoint 0123456789abcdef" in err and "rerun without --resume" in err
    assert len(log.read_text().splitlines()) == 1
    # records from before the digest was kept: the dense test accuracy tells them apart
    del records[0]["checkpoint"]
    records[0]["dense_test_accuracy"] = 0.5
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.main([*more, "--resume"]) == 2
    assert "test accuracy 0.5" in capsys.readouterr().err


def test_stop_after_starts_no_new_group_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plan = _write(tmp_path, PLAN)
    both = _args(tmp_path, plan, "--budgets", "flops=0.5,flops=0.25", "--searchers", "uniform")
    assert bench.main([*both, "--stop-after", "-1"]) == 2
    assert "--stop-after must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
    assert bench.main([*both, "--stop-after", "0"]) == 0  # one group always runs
    out = capsys.readouterr().out
    assert "1 groups left; go on with --resume" in out
    log = tmp_path / "out" / "benchmark_runs.jsonl"
    (first,) = [json.loads(line)["group"] for line in log.read_text().splitlines()]
    assert first == "resnet20/channel/flops=0.5"
    assert "Partial: 1 of 2 groups recorded" in (tmp_path / "out" / "benchmark.md").read_text()
    assert bench.main([*both, "--resume", "--stop-after", "0"]) == 0
    groups = [json.loads(line)["group"] for line in log.read_text().splitlines()]
    assert groups == [first, "resnet20/channel/flops=0.25"]
    assert "Partial" not in (tmp_path / "out" / "benchmark.md").read_text()


def test_a_model_can_ship_its_checkpoint(tmp_path):
    """models.<name>.checkpoint (relative to the plan's folder) becomes every group's
    model.checkpoint; a missing file is refused when the plan is read."""
    plan = json.loads(json.dumps(PLAN))
    plan["models"]["resnet20"]["checkpoint"] = "weights/r20.pt"
    path = _write(tmp_path, plan)
    with pytest.raises(bench.ConfigError, match=r"checkpoint .*r20\.pt not found"):
        bench.load_plan(path, bench.parse_args([]))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "r20.pt").write_bytes(b"")
    loaded = bench.load_plan(path, bench.parse_args([]))
    for group in loaded.groups:  # the granularity groups too
        cfg = loaded.config(group, None)
        assert cfg.model.checkpoint == str(tmp_path / "weights" / "r20.pt")


def test_the_report_names_the_code_revisions_of_its_groups():
    assert bench.revisions_note([{"group": "a"}]) == ""  # records that predate revisions
    one = [{"group": "a", "revision": "abc1234"}, {"group": "b", "revision": "abc1234"}]
    assert bench.revisions_note(one) == " Code: revision abc1234."
    two = [*one, {"group": "c", "revision": "def5678+dirty"}]
    assert bench.revisions_note(two) == " Code: abc1234 (a, b); def5678+dirty (c)."
    older = [*one, {"group": "d"}]  # a record from before revisions were kept
    assert bench.revisions_note(older) == " Code: abc1234 (a, b); not recorded (d)."


def test_table_latency_ratios_are_the_tables_prediction_for_the_pruned_models(default_task):
    """The report's table latency ratio of a policy is what the lookup table predicts for the
    model that policy prunes to (read from its layers), over the dense prediction; only for a
    latency budget."""
    import numpy as np

    task = default_task
    rng = np.random.default_rng(0)
    policies = [task.ratios_dict(rng.uniform(0.0, 0.6, len(task.units))) for _ in range(2)]
    got = bench.table_ratios(task, "latency=0.6", policies)
    table = task.latency_table
    for policy, ratio in zip(policies, got, strict=True):
        expected = table.predict_model(task.prune(policy)) / table.predict({})
        assert ratio == pytest.approx(expected, rel=1e-6) and ratio < 1.0
    assert bench.table_ratios(task, "flops=0.5", policies) == [None, None]


def test_latency_note_names_groups_timed_the_old_ways():
    now = {"group": "m/channel/flops=0.5", "latency_timing_version": bench.LATENCY_TIMING_VERSION}
    beside = {"group": "m/channel/flops=0.25"}  # timed as each search ended
    cold = {"group": "m/channel/params=0.3", "latency_timing_version": 2}  # one pass per round
    assert (
        bench.latency_note([now])
        == f" Latencies are timed {bench.LATENCY_TIMING}, nothing else running."
    )
    note = bench.latency_note([now, beside, cold])
    assert "in m/channel/flops=0.25 each pruned model was timed as its search ended" in note
    assert "in m/channel/params=0.3 all the group's models were timed together" in note
    assert "flops=0.5" not in note.split("except")[1]
