"""The ``autoprune`` CLI end to end: search -> best -> apply, compare, a real MLflow server,
interrupt (SIGINT / SIGKILL) and resume, bad input, help texts.

Every command runs the real console script as a subprocess in its own ``tmp_path`` folder (one
torch thread, the checkpoint cache conftest sets), so what is tested is what a user sees: exit
codes, one-line errors on stderr, and a fresh process reading what another one recorded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from test_tracking import free_port, running_mlflow_server, simulate
from typer.testing import CliRunner

from autoprune.apply import load_pruned
from autoprune.cli import app
from autoprune.config import ConfigError
from autoprune.costs.counting import measure_macs
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.runner.experiment import _recover
from autoprune.runner.journal import Journal
from autoprune.task import build_task
from autoprune.tracking.reader import TrackingStore
from autoprune.tracking.store import TrackingError
from autoprune.tracking.writer import Tracker
from autoprune.training import evaluate_accuracy

BIN = Path(sys.executable).parent
# The search every interrupted run is compared with: same flags, same seed, never interrupted.
RANDOM_60 = (
    "search", "--searcher", "random", "--budget", "flops=0.5", "--evaluations", "60",
    "--experiment", "X", "search.workers=0", "tracking.flush_every=5", "threads=1",
)  # fmt: skip
PER_STEP = ("accuracy", "loss", "flops_ratio")  # metrics logged once per evaluation


# ------------------------------------------------------------------------------ helpers
def _env(**extra: str) -> dict[str, str]:
    """The test's environment (AUTOPRUNE_CACHE from conftest), one torch thread, wide tables,
    no tracking URI or HTTP settings inherited from the user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "autoprune"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


def cli_here(
    *args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """The CLI's entry point in this process (for commands refused before any work: no
    interpreter and imports to start): exit code, stdout and stderr as a subprocess gives them."""
    from autoprune.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["autoprune", *args])
    capfd.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["autoprune", *args], code, out, err)


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr}"
    assert "Traceback" not in run.stderr
    return run.stdout


def one_line_error(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, ``error: ...`` containing ``fragments``."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr}"
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def store_of(folder: Path) -> TrackingStore:
    return TrackingStore(f"sqlite:///{folder}/mlflow.db")


def parent_of(stdout: str) -> str:
    match = re.search(r"MLflow run: ([0-9a-f]{32})", stdout)
    assert match, stdout
    return match.group(1)


def only_child(store: TrackingStore, parent: str) -> dict[str, Any]:
    children = store.child_runs(parent)
    assert len(children) == 1, children
    return children[0]


def journal_rows(folder: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The complete lines of the (one) local journal of a folder."""
    paths = sorted((folder / ".autoprune" / "journal").glob(f"{run_id or '*'}.jsonl"))
    if not paths:
        return []
    assert len(paths) == 1, paths
    rows = []
    for line in paths[0].read_text().splitlines():
        with suppress(json.JSONDecodeError):  # a line cut short by a kill
            rows.append(json.loads(line))
    return rows


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Cells of the rich table rows in ``stdout``, keyed by their first cell."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.lstrip().startswith("│") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def metric_steps(store: TrackingStore, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store.client.get_metric_history(run_id, key))


def _default_sigint() -> None:
    """A background job started without job control inherits SIGINT ignored; Ctrl-C is tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args: tuple[str, ...], cwd: Path, sig: signal.Signals, lines: int = 15) -> int:
    """Start a search, wait until its journal has ``lines`` evaluations, send ``sig``; returns
    the exit code (stdout/stderr in ``cwd/out.txt`` and ``cwd/err.txt``)."""
    with (cwd / "out.txt").open("w") as out, (cwd / "err.txt").open("w") as err:
        proc = subprocess.Popen(
            [str(BIN / "autoprune"), *args], stdout=out, stderr=err, cwd=cwd, env=_env(),
            preexec_fn=_default_sigint,  # like a terminal's foreground job, even under nohup
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while len(journal_rows(cwd)) < lines:
                assert proc.poll() is None, (cwd / "err.txt").read_text()
                assert time.monotonic() < deadline, "the search did not start in time"
                time.sleep(0.05)
            proc.send_signal(sig)
            return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def assert_complete(store: TrackingStore, run_id: str, total: int) -> list[dict[str, Any]]:
    """A finished run with evaluations 1..total, each logged once (history and metrics)."""
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["evaluations"] == total
    history = store.history(run_id)
    assert [r["index"] for r in history] == list(range(1, total + 1))
    for key in PER_STEP:
        assert metric_steps(store, run_id, key) == list(range(1, total + 1)), key
    return history


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted random search (60 evaluations) in its own folder, shared by the tests
    of ``best``, ``apply`` and resume (the reference an interrupted search must reproduce)."""
    folder = tmp_path_factory.mktemp("searched")
    stdout = ok(cli(*RANDOM_60, "--out", "best.json", cwd=folder))
    parent = parent_of(stdout)
    store = store_of(folder)
    child = only_child(store, parent)
    return {
        "folder": folder,
        "stdout": stdout,
        "parent": parent,
        "child": child["run_id"],
        "policy": json.loads((folder / "best.json").read_text()),
        "history": store.history(child["run_id"]),
    }


# ------------------------------------------------------------------ search, best, apply
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_best_returns_what_search_saved(searched: dict[str, Any]) -> None:
    folder, saved = searched["folder"], searched["policy"]
    assert saved["searcher"] == "random" and saved["budget"] == {"flops": 0.5}
    assert saved["metrics"]["flops_ratio"] <= 0.5
    printed = table_rows(searched["stdout"])
    assert {u: printed[u][0] for u in saved["ratios"]} == {
        u: f"{r:.3f}" for u, r in saved["ratios"].items()
    }
    by_experiment = json.loads(ok(cli("best", "--experiment", "X", "--json", cwd=folder)))
    assert by_experiment == saved
    by_run = json.loads(ok(cli("best", "--run", searched["child"], "--json", cwd=folder)))
    assert by_run == saved
    assert by_run["ratios"] == saved["ratios"]  # exactly, not rounded
    store = store_of(folder)
    metrics = store.get_run(searched["child"]).data.metrics
    assert metrics["best_search_accuracy"] == saved["metrics"]["accuracy"]
    assert store.get_run(searched["parent"]).info.status == "FINISHED"
    assert len(journal_rows(folder, searched["child"])) == 60


def count(cell: str) -> float:
    """``2.533 M`` -> 2533000.0 (the CLI prints counts with 4 significant digits)."""
    number, _, suffix = cell.partition(" ")
    return float(number) * {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}[suffix]


def check_product(stdout: str, path: Path, policy: dict[str, Any], default_task: Any) -> None:
    """The dense-vs-pruned table agrees with the saved model, measured independently."""
    printed = table_rows(stdout)
    assert "MACs" in printed and "test accuracy" in printed, stdout
    dense_macs, first_macs, pruned_macs, ratio = printed["MACs"]
    model, saved = load_pruned(path)
    assert saved.ratios == policy["ratios"]
    measured = measure_macs(model, (1, 8, 8))
    dense_measured = measure_macs(default_task.model, (1, 8, 8))
    assert measured == pytest.approx(count(pruned_macs), rel=1e-3) == count(first_macs)
    assert dense_measured == pytest.approx(count(dense_macs), rel=1e-3)
    assert float(ratio) == pytest.approx(measured / dense_measured, abs=1e-3)
    # The search's analytic FLOPs ratio is the measured one (convolutions and the classifier).
    reported = policy["metrics"]["flops_ratio"] * dense_measured
    assert measured == pytest.approx(reported, rel=1e-6)
    data = default_task.data
    accuracy, _ = evaluate_accuracy(model, data.x_test, data.y_test)
    assert accuracy == pytest.approx(float(printed["test accuracy"][2]), abs=1e-4)
    dense_accuracy, _ = evaluate_accuracy(default_task.model, data.x_test, data.y_test)
    assert dense_accuracy == pytest.approx(float(printed["test accuracy"][0]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_apply_writes_a_model_with_the_reported_macs(
    searched: dict[str, Any], default_task
) -> None:
    folder = searched["folder"]
    stdout = ok(cli("apply", "--policy", "best.json", "--out", "pruned.pt", cwd=folder))
    check_product(stdout, folder / "pruned.pt", searched["policy"], default_task)


# ------------------------------------------------------------------------------ compare
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_compare_records_one_child_per_searcher(tmp_path: Path, default_task: Any) -> None:
    args = (
        "compare", "--searchers", "random,uniform,sensitivity", "--budget", "flops=0.5",
        "--evaluations", "14", "--experiment", "C", "search.options.sensitivity.grid=[0.5]",
        "threads=1", "--apply", "product.pt", "--apply-epochs", "1",
    )  # fmt: skip
    run = cli(*args, cwd=tmp_path)
    stdout = ok(run)
    assert "note: uniform evaluates 1 policy: evaluations=14 does not apply to it" in run.stderr
    parent = parent_of(stdout)
    store = store_of(tmp_path)
    children = store.child_runs(parent)
    assert [c["searcher"] for c in children] == ["random", "uniform", "sensitivity"]
    assert {c["status"] for c in children} == {"FINISHED"}
    assert {c["parent_id"] for c in children} == {parent}
    # random: --evaluations; uniform: one; sensitivity: dense + 12 units x 1 ratio + final.
    assert [c["evaluations"] for c in children] == [14, 1, 14]
    # The product: the best policy applied, fine-tuned and saved; the table agrees with it.
    best = json.loads((tmp_path / "best_policy.json").read_text())
    check_product(stdout, tmp_path / "product.pt", best, default_task)
    listed = store.list_runs("C")
    assert sorted(r["run_id"] for r in listed if r["kind"] == "search") == sorted(
        c["run_id"] for c in children
    )
    assert [r["run_id"] for r in listed if r["kind"] == "parent"] == [parent]

    listing = ok(cli("runs", "--experiment", "C", cwd=tmp_path))
    ids = [line.strip("│ ").split()[0] for line in listing.splitlines() if line.startswith("│")]
    assert ids == [parent, *(c["run_id"] for c in children)]  # whole ids, launch first
    ranked = {c["run_id"]: c["metrics"].get("policy_accuracy") for c in children}
    for line in listing.splitlines():
        if line.startswith("│") and ranked.get(line.strip("│ ").split()[0]) is not None:
            assert f"{ranked[line.strip('│ ').split()[0]]:.4f}" in line  # what best ranks by
    recorded = table_rows(ok(cli("compare", "--recorded", "--experiment", "C", cwd=tmp_path)))
    for child in children:
        cells = recorded[child["searcher"]]
        assert cells[:2] == ["0", "FINISHED"], cells
        assert f"{child['best_search_accuracy']:.4f}" == cells[2]
        assert str(child["evaluations"]) in cells


# ------------------------------------------------------------------- a tracking server
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_search_and_best_through_a_tracking_server(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with running_mlflow_server(tmp_path) as uri:
        args = (
            "search", "--searcher", "random", "--budget", "flops=0.5", "--evaluations", "12",
            "--experiment", "S", "--tracking-uri", uri, "--out", "best.json", "threads=1",
        )  # fmt: skip
        stdout = ok(cli(*args, cwd=work))
        saved = json.loads((work / "best.json").read_text())
        store = TrackingStore(uri)
        child = only_child(store, parent_of(stdout))
        assert child["status"] == "FINISHED" and child["evaluations"] == 12
        by_experiment = ok(
            cli("best", "--experiment", "S", "--tracking-uri", uri, "--json", cwd=work)
        )
        assert json.loads(by_experiment) == saved
        assert len(store.history(child["run_id"])) == 12
    assert not (work / "mlflow.db").exists()  # everything went to the server
    assert (tmp_path / "s.db").is_file() and any((tmp_path / "art").rglob("best_policy.json"))


# --------------------------------------------------------------- interrupt and resume
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_random_search_resumes_exactly(
    tmp_path: Path, sig: signal.Signals, searched: dict[str, Any]
) -> None:
    code = interrupt(RANDOM_60, tmp_path, sig)
    stderr = (tmp_path / "err.txt").read_text()
    store = store_of(tmp_path)
    parents = [r for r in store.list_runs("X") if r["kind"] == "parent"]
    assert len(parents) == 1
    parent = parents[0]["run_id"]
    child = only_child(store, parent)["run_id"]
    before = journal_rows(tmp_path, child)
    assert 15 <= len(before) < 60
    assert [r["index"] for r in before] == list(range(1, len(before) + 1))
    logged = store.history(child)
    if sig == signal.SIGINT:
        assert code == 130, stderr
        assert f"--resume {parent}" in stderr
        assert "Traceback" not in stderr
        assert store.get_run(child).info.status == "KILLED"
        assert store.get_run(parent).info.status == "KILLED"
        assert logged == before  # Ctrl-C flushed everything the journal has
        assert metric_steps(store, child, "accuracy") == list(range(1, len(before) + 1))
    else:
        assert code == -signal.SIGKILL
        assert store.get_run(child).info.status == "RUNNING"
        assert logged == before[: len(logged)]  # MLflow has a prefix; the journal the rest

    ok(cli("search", "--resume", parent, "--out", "resumed.json", cwd=tmp_path))
    history = assert_complete(store, child, 60)
    assert only_child(store, parent)["run_id"] == child  # continued, not started again
    assert store.get_run(parent).info.status == "FINISHED"
    assert history[: len(before)] == before  # everything the journal had, unchanged
    assert journal_rows(tmp_path, child) == history
    # Replay rebuilds the searcher's state exactly: the same policies as an uninterrupted run.
    reference = searched["history"]
    assert [(r["index"], r["ratios"], r["accuracy"]) for r in history] == [
        (r["index"], r["ratios"], r["accuracy"]) for r in reference
    ]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["ratios"] == searched["policy"]["ratios"]


def test_resume_repairs_a_flush_cut_by_a_kill(tmp_path: Path) -> None:
    """In-process (made-up records): a SIGKILL between a flush's history chunk and its metrics.

    It happens: the search above is killed right after its 15th evaluation, often while that
    evaluation's flush (11-15) is under way. Recovery logs the chunk's metrics once and uploads
    what only the journal has, with ``best_accuracy`` as the search had it."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    run_id = tracker.start_child(tracker.start_parent("p", {}), "random", 0, {})
    records = simulate(17).history
    journal = Journal(run_id, root=tmp_path)
    for record in records:
        journal.append(record)
    simulate(10, tracker.logger(run_id, flush_every=5, flush_seconds=60))  # 1-5, 6-10 flushed
    cut = "".join(json.dumps(r.to_dict()) + "\n" for r in records[10:15])
    tracker.client.log_text(run_id, cut, "history/000011-000015.jsonl")  # killed here

    rows = _recover(tracker, journal, run_id)
    assert [r["index"] for r in rows] == list(range(1, 18))
    assert [r["index"] for r in tracker.history(run_id)] == list(range(1, 18))
    for key in ("accuracy", "flops_ratio", "meets_budget", "best_accuracy"):
        assert metric_steps(tracker, run_id, key) == list(range(1, 18)), key
    best = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "best_accuracy")}
    assert [best[i] for i in range(1, 18)] == pytest.approx(simulate(17).best_so_far())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_interrupted_ddpg_search_resumes(tmp_path: Path) -> None:
    args = (
        "search", "--searcher", "ddpg", "--budget", "flops=0.5", "--evaluations", "30",
        "--experiment", "D", "search.workers=0", "tracking.flush_every=5",
        "search.options.ddpg.warmup_episodes=10", "threads=1",
    )  # fmt: skip
    code = interrupt(args, tmp_path, signal.SIGINT)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 130, stderr
    store = store_of(tmp_path)
    parent = re.search(r"--resume ([0-9a-f]{32})", stderr)
    assert parent, stderr
    child = only_child(store, parent.group(1))["run_id"]
    assert store.get_run(child).info.status == "KILLED"
    before = journal_rows(tmp_path, child)
    assert 15 <= len(before) < 30
    assert store.history(child) == before

    ok(cli("search", "--resume", parent.group(1), cwd=tmp_path))
    history = assert_complete(store, child, 30)
    assert history[: len(before)] == before
    assert [r["note"] for r in history[:10]] == ["warm-up"] * 10
    assert all(r["note"] != "warm-up" for r in history[10:])


# --------------------------------------------------------------------------- bad input
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("search", "bad.yaml", "--searcher", "random"), ["malformed YAML in bad.yaml", "line 1"]),
        (
            ("search", "--searcher", "random", "search.bogus=1", "modle.name=x"),
            ["invalid config", "search.bogus: Extra inputs", "modle: Extra inputs"],
        ),
        (("units", "model.name=nope"), ["unknown model 'nope'"]),
    ],
    ids=["yaml", "config-keys", "model"],
)
def test_bad_input_is_a_one_line_error(
    tmp_path: Path, args: tuple[str, ...], fragments: list[str], monkeypatch, capfd
) -> None:
    """Refused before any work (the unknown searcher: see the unreachable server test)."""
    (tmp_path / "bad.yaml").write_text("model: [unclosed\nsearch:\n  budget: flops=0.5\n")
    one_line_error(cli_here(*args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd),
                   *fragments)  # fmt: skip
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was recorded


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unreachable_budget_names_the_smallest_reachable(
    tmp_path: Path, monkeypatch, capfd
) -> None:
    run = cli_here("search", "--searcher", "random", "--budget", "flops=0.01", "threads=1",
                   cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "smallest reachable is flops=0.0" in errors[0]
    assert run.stderr.strip().splitlines()[-1] == errors[0]
    assert store_of(tmp_path).list_runs("autoprune") == []  # no run was started


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_best_of_a_missing_experiment(searched: dict[str, Any], tmp_path: Path) -> None:
    run = cli("best", "--experiment", "nope", cwd=searched["folder"])  # a store with "X" only
    one_line_error(run, "no MLflow experiment named 'nope'")
    # Where nothing was recorded, a reader (best, runs, compare --recorded) refuses instead of
    # creating an empty mlflow.db (in-process: the same TrackingError the CLI prints).
    with pytest.raises(TrackingError, match=r"no MLflow database at .*nothing was recorded"):
        TrackingStore(f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    """One line, before any work, not MLflow's minutes of retries (7 with exponential backoff,
    120 s timeouts): the subprocess limit is a guard against that hang, not a timing."""
    uri = f"http://127.0.0.1:{free_port()}"
    args = ("search", "--searcher", "random", "--evaluations", "3", "--tracking-uri", uri)
    run = cli(*args, cwd=tmp_path, timeout=90)
    one_line_error(run, f"MLflow tracking server {uri} is unreachable")
    assert not list(tmp_path.iterdir()), "nothing is recorded or built for a search that fails"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_apply_refuses_a_policy_of_another_model(
    tmp_path: Path, default_task, monkeypatch, capfd
) -> None:
    """A policy whose fingerprint comes from a plain20 task, applied to the resnet20 task."""
    checkpoint = tmp_path / "plain20.pt"
    torch.save(build_model("plain20", 1, 10).state_dict(), checkpoint)
    plain = build_task(overrides=["model.name=plain20", f"model.checkpoint={checkpoint}"])
    Policy.from_task(plain, {u: 0.25 for u in plain.units}).save(tmp_path / "plain20.json")
    run = cli_here("apply", "--policy", "plain20.json", "--out", "x.pt", cwd=tmp_path,
                   monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    one_line_error(run, "policy was made for model='plain20', but the task has model='resnet20'")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["search", "compare", "best", "runs", "apply", "sensitivity"])
def test_help_has_an_example(command: str) -> None:
    """In-process (typer's runner): the help texts only, no subprocess needed."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"autoprune {command}" in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--apply", "."], "--apply . is a folder"),
        (["--apply", "missing/pruned.pt"], "folder missing does not exist"),
        (["--out", "nowhere/best.json"], "folder nowhere does not exist"),
    ],
)
def test_a_bad_output_path_is_refused_before_the_search(
    tmp_path: Path, args, words, monkeypatch, capfd
) -> None:
    run = cli_here("search", "--searcher", "uniform", *args, cwd=tmp_path,
                   monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    one_line_error(run, words)
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, nothing was recorded


@pytest.mark.parametrize(
    ("overrides", "where", "message"),
    [
        (["search.searchers=[ddpg]", "search.evaluations=20"],
         "search.options.ddpg.warmup_episodes", "warm-up of 100 episodes must be below"),
        (["search.searchers=[netadapt]", "granularity=fine", "criterion=magnitude"],
         "search.searchers", "netadapt supports channel granularity only"),
    ],
)  # fmt: skip
def test_searcher_preflight_fails_at_config_time(overrides, where, message):
    """Searcher.preflight runs when the config is validated: before any task is built."""
    from autoprune.runner.config import experiment_config

    with pytest.raises(ConfigError) as err:
        experiment_config(None, overrides)
    text = str(err.value)
    assert text.startswith(where + ":") and message in text and "\n" not in text
