"""The service's defences, in process (no searches run): authentication before the body is read,
body limits, non-finite numbers, typed and bounded options, validation before launch, the Host
header without a token, and launches on the service's own Ray with no run left RUNNING."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from autoprune.runner.config import ExperimentConfig
from autoprune.runner.experiment import _resumed_config
from autoprune.service.app import create_app
from autoprune.service.jobs import JobManager
from autoprune.service.limits import Limits
from autoprune.service.settings import Settings

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _app(folder: Path, **settings: Any):
    base = {"token": TOKEN, "tracking_uri": f"sqlite:///{folder}/mlflow.db",
            "state_dir": folder / "state"}  # fmt: skip
    return create_app(Settings(**{**base, **settings}), start_jobs=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = _app(tmp_path_factory.mktemp("guard"), limits=Limits(body_kb=64))
    with TestClient(app) as c:
        yield c


def _asgi(guard, body_bytes: int, headers: dict[str, str], chunk: int = 8192):
    """Drive the guard as a server would: the body arrives in chunks; returns the status sent
    and how many bytes of the body were pulled, and whether the app behind it was reached."""
    import asyncio

    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        size = min(chunk, body_bytes - pulled)
        pulled += size
        return {"type": "http.request", "body": b" " * size, "more_body": pulled < body_bytes}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/searches",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"] if sent else None, pulled


def test_authentication_and_size_come_before_the_body(tmp_path):
    from autoprune.service.guard import RequestGuard

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    settings = Settings(token=TOKEN, limits=Limits(body_kb=64))
    guard = RequestGuard(app, settings)
    json_type = {"content-type": "application/json", "host": "127.0.0.1"}
    # no token: 401 before a byte of a 40 MB body is read
    assert _asgi(guard, 40 * 1024**2, json_type) == (401, 0)
    # a token and a declared length over the limit: 413, nothing read
    declared = {**json_type, **AUTH, "content-length": str(40 * 1024**2)}
    assert _asgi(guard, 40 * 1024**2, declared) == (413, 0)
    # a token and no declared length: read up to the limit, then 413
    status, pulled = _asgi(guard, 40 * 1024**2, {**json_type, **AUTH})
    assert status == 413 and pulled <= 64 * 1024 + 8192
    assert not reached
    # within the limit: passed on whole
    assert _asgi(guard, 1000, {**json_type, **AUTH}) == (None, 1000)
    assert reached == ["/v1/searches"]


def test_no_token_gets_401_and_nothing_is_parsed(client):
    malformed = client.post("/v1/searches", content=b"{not json",
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert malformed.status_code == 401  # not 422: nothing is parsed for a stranger
    big = client.post("/v1/searches", content=b" " * (1024**2),
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert big.status_code == 401


def test_an_oversized_body_gets_413(client):
    r = client.post("/v1/searches", content=b" " * (65 * 1024),
                    headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client, constant: str):
    text = '{"search": {"options": {"ddpg": {"sigma": CONSTANT}}}}'.replace("CONSTANT", constant)
    r = client.post("/v1/searches", content=text.encode(),
                    headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body"] and constant.lstrip("-") in r.text


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"search": {"finetune_epochs": 10**9}}, ["search", "finetune_epochs"]),
        ({"search": {"searchers": ["ddpg"], "evaluations": 200,
                     "options": {"ddpg": {"net_arch": [100000, 100000]}}}},
         ["search", "options", "ddpg", "net_arch", 0]),
        ({"search": {"searchers": ["ddpg"], "evaluations": 200,
                     "options": {"ddpg": {"buffer_size": 10**12}}}},
         ["search", "options", "ddpg", "buffer_size"]),
        ({"search": {"searchers": ["netadapt"], "options": {"netadapt": {"finetune_batches":
                                                                       10**9}}}},
         ["search", "options", "netadapt", "finetune_batches"]),
        ({"eval": {"bn_batches": 10**9}}, ["eval", "bn_batches"]),
        ({"threads": 10**6}, ["threads"]),
        ({"search": {"searchers": ["random", "evolution"], "evaluations": 2000,
                     "seeds": list(range(6))}}, ["search"]),
        ({"search": {"searchers": ["evolution"], "evaluations": 100,
                     "options": {"evolution": {"population": 5000}}}},
         ["search", "options", "evolution", "population"]),
    ],
)  # fmt: skip
def test_every_cost_a_request_sets_is_bounded(client, body: dict, loc: list):
    r = client.post("/v1/searches", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][1:] == loc, r.json()


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"random": {"seeds": "abc"}}, ["search", "options", "random", "seeds"]),
        ({"random": {"seeds": []}}, ["search", "options", "random", "seeds"]),
        ({"bogus": {}}, ["search", "options"]),
        ({"ddpg": {"algo": "sac"}}, ["search", "options", "ddpg", "algo"]),
        ({"ddpg": {"sigma": None}}, ["search", "options", "ddpg", "sigma"]),
        ({"ddpg": {"nope": 1}}, ["search", "options", "ddpg", "nope"]),
    ],
)
def test_former_server_errors_are_422_with_the_field(client, options: dict, loc: list):
    r = client.post("/v1/searches", json={"search": {"options": options}}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][1:] == loc, r.json()


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"search": {"searchers": ["ddpg"], "evaluations": 50}},
         ["search", "options", "ddpg", "warmup_episodes"], "warm-up of 100"),
        ({"granularity": "fine", "criterion": "magnitude",
          "search": {"searchers": ["netadapt"]}}, ["search", "searchers"], "channel"),
        ({"search": {"budget": "flops=0.01", "searchers": ["uniform"]}}, ["search", "budget"],
         "unreachable"),
        ({"search": {"searchers": ["sensitivity"], "evaluations": 10}},
         ["search", "evaluations"], "sensitivity needs 50"),
        ({"data": {"test_fraction": 0.75}}, ["data"], "does not fit in the training set"),
    ],
)  # fmt: skip
def test_what_would_fail_after_launch_is_refused_before_it(client, body, loc, words):
    r = client.post("/v1/searches", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][1:] == loc and words in detail["msg"], detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none(client):
    r = client.post("/v1/searches", json={"device": "cuda"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "device"]


def test_a_valid_request_is_still_accepted(client):
    body = {"search": {"searchers": ["random", "evolution"], "evaluations": 30,
                       "options": {"evolution": {"population": 10, "parents": 3}}}}  # fmt: skip
    r = client.post("/v1/searches", json=body, headers=AUTH)
    assert r.status_code == 202, r.text


def test_options_are_typed_in_the_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    options = schema["components"]["schemas"]["SearchConfig"]["properties"]["options"]
    assert options["additionalProperties"] is False
    ddpg = options["properties"]["ddpg"]["properties"]
    assert ddpg["buffer_size"]["maximum"] == 10_000_000
    assert set(options["properties"]) >= {"ddpg", "evolution", "netadapt", "random"}


def test_without_a_token_the_host_header_must_be_loopback(tmp_path):
    app = _app(tmp_path, token=None)
    with TestClient(app, base_url="http://127.0.0.1:8080") as local:
        assert local.get("/v1/searches").status_code == 200
    with TestClient(app, base_url="http://evil.example:8080") as rebound:
        r = rebound.get("/v1/searches")
        assert r.status_code == 400 and "Host" in r.json()["detail"]
    with TestClient(app, base_url="http://[::1]:8080") as v6:
        assert v6.get("/health").status_code == 200


class _FakeContext:
    """Stands in for multiprocessing's spawn context: records the launch config, then reports
    the launch stopped without it ending its runs (a cancel that lands during start-up)."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def Pipe(self, duplex: bool = False):
        import multiprocessing

        return multiprocessing.Pipe(duplex=duplex)

    def Process(self, target, args, name):
        config, _run_id, sender = args
        self.seen.append(config)
        sender.send(("stopped", None))

        class Done:
            pid = None
            exitcode = 0

            def start(self) -> None: ...

            def is_alive(self) -> bool:
                return False

            def join(self, timeout: float | None = None) -> None: ...

        return Done()


def test_resumed_launches_use_the_service_ray_and_leave_no_run_running(tmp_path, monkeypatch):
    import multiprocessing

    from autoprune.runner.config import experiment_config
    from autoprune.tracking.writer import Tracker

    seen: list[dict] = []
    monkeypatch.setattr(multiprocessing, "get_context", lambda _kind: _FakeContext(seen))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "service")
    settings = Settings(tracking_uri=tracker.uri, state_dir=tmp_path / "state")
    jobs = JobManager(settings, tracker, start=False, ray_address="127.0.0.1:6390")
    cfg = experiment_config({"search": {"searchers": ["random"], "evaluations": 5}})
    job = jobs.submit(cfg, "search")  # the parent run exists, RUNNING, as a launch leaves it
    child = tracker.client.create_run(
        tracker.experiment_id, tags={"mlflow.parentRunId": job.id, "autoprune.kind": "search",
                                     "autoprune.searcher": "random", "autoprune.seed": "0"}
    ).info.run_id  # fmt: skip
    job.stop = "cancel"
    jobs._run(job, resume=True)
    assert seen[0]["search"]["ray_address"] == "127.0.0.1:6390"
    assert job.state == "cancelled"
    assert tracker.get_run(job.id).info.status == "KILLED"
    assert tracker.client.get_run(child).info.status == "KILLED"
    resumed = jobs.resume(job.id, "search", experiment_config(tracker.config_of(job.id)))
    jobs._run(resumed, resume=True)  # a resume, from the recorded config: the same Ray
    assert seen[1]["search"]["ray_address"] == "127.0.0.1:6390"
    # ... and what the launch process runs: the recorded config (which names no Ray) with the
    # service's Ray kept, not a local Ray of its own
    assert tracker.config_of(job.id)["search"]["ray_address"] is None
    ran, _ = _resumed_config(tracker, ExperimentConfig.model_validate(seen[1]), job.id)
    assert ran.search.ray_address == "127.0.0.1:6390"


class _SilentContext(_FakeContext):
    """A launch process that dies without a word, with the given exit code."""

    def __init__(self, exitcode: int) -> None:
        super().__init__([])
        self.exitcode = exitcode

    def Process(self, target, args, name):
        args[2].close()  # says nothing: the pipe just ends
        exitcode = self.exitcode

        class Dead:
            pid = None

            def __init__(self) -> None:
                self.exitcode = exitcode

            def start(self) -> None: ...

            def is_alive(self) -> bool:
                return False

            def join(self, timeout: float | None = None) -> None: ...

        return Dead()


def _record(index: int):
    """A made-up evaluation record (over budget) for a journal or a history."""
    from autoprune.agents.base import Record

    row = {"index": index, "ratios": {"conv1": 0.1 * index}, "accuracy": 0.8, "loss": 0.1}
    return Record.from_dict(
        {**row, "flops_ratio": 0.9, "params_ratio": 0.9, "meets_budget": False, "elapsed": 1.0}
    )


def _silent_outcome(tmp_path, monkeypatch, exitcode: int) -> tuple[str, str]:
    import multiprocessing

    from autoprune.runner.config import experiment_config
    from autoprune.tracking.writer import Tracker

    monkeypatch.setattr(multiprocessing, "get_context", lambda _kind: _SilentContext(exitcode))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow-{exitcode}.db", "service")
    settings = Settings(tracking_uri=tracker.uri, state_dir=tmp_path / "state")
    jobs = JobManager(settings, tracker, start=False)
    job = jobs.submit(experiment_config({"search": {"searchers": ["random"]}}), "search")
    jobs._run(job, resume=True)
    return job.state, tracker.get_run(job.id).info.status


def test_a_launch_killed_by_sigterm_is_interrupted_not_failed(tmp_path, monkeypatch):
    """The service's process group stopped (its launch gets the SIGTERM too, maybe before the
    service notices it is closing): resumable, never a failed search."""
    import signal

    assert _silent_outcome(tmp_path, monkeypatch, -signal.SIGTERM) == ("interrupted", "KILLED")
    assert _silent_outcome(tmp_path, monkeypatch, 143) == ("interrupted", "KILLED")
    assert _silent_outcome(tmp_path, monkeypatch, 1) == ("failed", "FAILED")  # a real crash


def test_a_stopped_launch_gets_its_journaled_evaluations_into_mlflow(tmp_path, monkeypatch):
    """A launch stopped before its logger flushed: what its journal holds (written at every
    evaluation) is uploaded when the service ends its runs, so its status counts it."""
    import multiprocessing
    import signal

    from autoprune.runner.config import experiment_config
    from autoprune.runner.journal import Journal
    from autoprune.tracking.writer import Tracker

    monkeypatch.chdir(tmp_path)  # launches share the service's working folder
    monkeypatch.setattr(
        multiprocessing, "get_context", lambda _kind: _SilentContext(-signal.SIGTERM)
    )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "service")
    settings = Settings(tracking_uri=tracker.uri, state_dir=tmp_path / "state")
    jobs = JobManager(settings, tracker, start=False)
    job = jobs.submit(experiment_config({"search": {"searchers": ["random"]}}), "search")
    child = tracker.client.create_run(
        tracker.experiment_id, tags={"mlflow.parentRunId": job.id, "autoprune.kind": "search",
                                     "autoprune.searcher": "random", "autoprune.seed": "0"}
    ).info.run_id  # fmt: skip
    tracker.log_rows(child, [_record(1).to_dict()])
    journal = Journal(child)
    for i in (1, 2, 3):  # the first also reached MLflow, the other two only the journal
        journal.append(_record(i))
    jobs._run(job, resume=True)
    assert job.state == "interrupted"
    assert [int(r["index"]) for r in tracker.history(child)] == [1, 2, 3]  # none twice
    assert tracker.client.get_run(child).info.status == "KILLED"


def test_a_cancel_the_launch_missed_is_signalled_again_after_the_grace(tmp_path, monkeypatch):
    """A launch still starting up (SIGINT not yet handled) misses the first SIGINT of a cancel:
    the service signals it again once the repeat grace is over, and the cancel lands."""
    import multiprocessing
    import signal
    import time

    from autoprune.runner.config import experiment_config
    from autoprune.service import jobs as jobs_module
    from autoprune.tracking.writer import Tracker

    kills: list[int] = []

    class Starting(_FakeContext):
        def Pipe(self, duplex: bool = False):
            receiver, sender = multiprocessing.Pipe(duplex=duplex)

            class Held:  # the launch's end of the pipe, which the service closes on its side
                def send(self, message) -> None:
                    sender.send(message)

                def close(self) -> None: ...

            return receiver, Held()

        def Process(self, target, args, name):
            sender = args[2]

            class Proc:
                pid = 424242
                exitcode = 0
                started = time.monotonic()

                def start(self) -> None: ...

                def is_alive(self) -> bool:  # gone after 15 s: a service that never signals
                    return time.monotonic() - self.started < 15  # again fails, not hangs

                def join(self, timeout: float | None = None) -> None: ...

            def kill(pid: int, signum: int) -> None:
                assert pid == Proc.pid
                kills.append(signum)
                if len(kills) == 2:  # the first was lost; the second stops it
                    sender.send(("stopped", None))

            monkeypatch.setattr(jobs_module.os, "kill", kill)
            return Proc()

    monkeypatch.setattr(multiprocessing, "get_context", lambda _kind: Starting([]))
    monkeypatch.setattr(jobs_module, "REPEAT_GRACE_S", 0.0)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "service")
    settings = Settings(tracking_uri=tracker.uri, state_dir=tmp_path / "state")
    jobs = JobManager(settings, tracker, start=False)
    job = jobs.submit(experiment_config({"search": {"searchers": ["random"]}}), "search")
    job.stop = "cancel"
    jobs._run(job, resume=True)
    assert kills == [signal.SIGINT, signal.SIGINT]
    assert job.state == "cancelled"


def test_a_stop_signal_whose_unwind_breaks_is_still_a_stop(monkeypatch):
    """SIGTERM arrives, and what runs while the launch unwinds raises (an interrupted artifact
    cleanup, a Ray worker gone with the same process group): the launch reports a stop."""
    import multiprocessing
    import os
    import signal
    import time

    from autoprune.runner.config import experiment_config
    from autoprune.service import jobs as jobs_module

    def broken_unwind(cfg, resume, hooks):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises SystemExit here
        finally:
            raise OSError(9, "Bad file descriptor")

    def crash(cfg, resume, hooks):
        raise OSError(9, "Bad file descriptor")

    config = experiment_config({"search": {"searchers": ["random"]}}).model_dump(mode="json")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    outcomes = []
    try:
        for run in (broken_unwind, crash):
            monkeypatch.setattr(jobs_module, "run_experiment", run)
            monkeypatch.setattr(jobs_module, "_STOPS", [])
            receiver, sender = multiprocessing.Pipe(duplex=False)
            started = time.monotonic()
            jobs_module._job_process(config, "run", sender)
            assert time.monotonic() - started < 5  # SystemExit cut the sleep short
            outcomes.append(receiver.recv())
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert outcomes == [("stopped", None), ("failed", "OSError: [Errno 9] Bad file descriptor")]


def test_a_repeated_stop_signal_does_not_cut_the_unwind_short(monkeypatch):
    """The process group's SIGTERM, then the stopping service's SIGINT: one stop. A stop signal
    after the grace (an unwind that hangs) still raises."""
    import signal

    from autoprune.service import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "_STOPS", [])
    with pytest.raises(SystemExit):
        jobs_module._terminate(signal.SIGTERM, None)
    jobs_module._interrupt(signal.SIGINT, None)  # inside the grace: recorded, not raised
    assert [signum for signum, _ in jobs_module._STOPS] == [signal.SIGTERM, signal.SIGINT]
    monkeypatch.setattr(jobs_module, "REPEAT_GRACE_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        jobs_module._interrupt(signal.SIGINT, None)


def test_joining_ray_keeps_the_process_own_sigterm_handler(monkeypatch):
    """ray.init installs a plain sys.exit for SIGTERM; a launch's own handler (which records the
    stop) must survive it, while a process without one gets Ray's."""
    import signal

    import ray

    from autoprune.parallel import init_ray

    def rays_handler(signum, frame):  # what ray.init installs
        raise SystemExit(signum)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: signal.signal(signal.SIGTERM, rays_handler))

    def own(signum, frame):
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, own)
    try:
        init_ray(1)
        assert signal.getsignal(signal.SIGTERM) is own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        init_ray(1)
        assert signal.getsignal(signal.SIGTERM) is rays_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_processes_a_killed_service_left_are_stopped_on_the_next_start(tmp_path):
    import subprocess
    import sys

    from autoprune.service import reaper

    script = tmp_path / "ray" / "agent.py"  # a stand-in for ray::DashboardAgent
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(120)\n")
    other = tmp_path / "other.py"
    other.write_text("import time\ntime.sleep(120)\n")
    agent = subprocess.Popen([sys.executable, str(script)])
    bystander = subprocess.Popen([sys.executable, str(other)])
    try:
        pids = tmp_path / "state" / "ray-processes.json"
        assert reaper.record_descendants(pids) >= 1
        record = json.loads(pids.read_text())
        rows = record["processes"]
        assert agent.pid in [r["pid"] for r in rows]
        assert bystander.pid not in [r["pid"] for r in rows]  # not a Ray process
        # while the service that recorded them (this process) runs, nothing is touched
        assert reaper.reap(pids) == [] and agent.poll() is None and pids.exists()
        # the owner gone (a start time no process has); a pid recorded with another start time
        # belongs to a new process: left alone
        record["owner"]["start"] = -1
        rows.append({"pid": bystander.pid, "start": 1, "cmd": "/ray/recycled"})
        pids.write_text(json.dumps(record))
        stopped = reaper.reap(pids)
        assert agent.wait(timeout=10) == -9 and any("agent.py" in c for c in stopped)
        assert bystander.poll() is None and not pids.exists()
        assert reaper.reap(pids) == []  # nothing recorded: nothing to do
    finally:
        for proc in (agent, bystander):
            proc.kill()
            proc.wait()


def test_limits_are_listed_in_serve_help_and_set_by_name():
    from typer.testing import CliRunner

    from autoprune.cli import app
    from autoprune.service import limits

    shown = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert shown.exit_code == 0
    flat = "".join(ch for ch in shown.output if not ch.isspace() and ch != "│")  # unwrapped
    for name in limits.TABLE:
        assert f"{name}={limits.default(name)}(" in flat, name
    assert limits.parse(["evaluations=500", "body-kb=8"], workers=1) == {
        "workers": 1, "evaluations": 500, "body_kb": 8,
    }  # fmt: skip
    for bad, words in [("nope=1", "NAME one of"), ("evaluations=x", "must be an integer"),
                       ("evaluations=0", "at least 1")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            limits.parse([bad])


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"model": {"classifier": "criterion"}}, ["model", "classifier"], "classifier"),
        ({"ignore": [""]}, ["ignore"], "is not a module of the model"),
    ],
)
def test_layers_the_model_does_not_have_get_422(client, body: dict, loc: list, words: str):
    """Found by the schema fuzzer: a classifier or ignored layer the model lacks was a 500."""
    r = client.post("/v1/searches", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][1:] == loc and words in r.text
