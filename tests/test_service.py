"""The HTTP service: a real server process through the whole cycle, restart, authentication,
cancel, and schemathesis fuzzing of its own OpenAPI schema."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from autoprune.service.app import create_app
from autoprune.service.limits import Limits
from autoprune.service.settings import Settings

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BIN = Path(sys.executable).parent
SMALL = {"search": {"searchers": ["random"], "budget": "flops=0.5", "evaluations": 12}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``autoprune serve`` in its own process group, in a working folder."""

    def __init__(self, folder: Path, token: str | None = TOKEN, host: str = "127.0.0.1") -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("AUTOPRUNE_TOKEN", None)
        if token:
            env["AUTOPRUNE_TOKEN"] = token
        self.log = (folder / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "autoprune"), "serve", "--host", host, "--port", str(self.port),
                "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--max-concurrent", "1",
            ],
            cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the service did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()

    def get(self, path: str, **kw):
        return httpx.get(f"{self.url}{path}", headers=AUTH, timeout=30, **kw)

    def post(self, path: str, headers: dict[str, str] | None = None, **kw):
        return httpx.post(f"{self.url}{path}", headers=headers or AUTH, timeout=30, **kw)


def poll(server: Server, search_id: str, until, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get(f"/v1/searches/{search_id}").json()
        if until(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"timed out; last status {status}")


@pytest.mark.timeout(600)
def test_whole_cycle_against_a_real_server_and_a_restart(tmp_path, default_task):
    """Upload, search, policy, the CLI reading the same store, bad input; then a restart in the
    middle of a second search: nothing is lost and the search resumes to the end."""
    server = Server(tmp_path)
    try:
        server.wait_ready()
        # authentication: everything but /health needs the token
        assert httpx.get(f"{server.url}/v1/searches").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{server.url}/v1/searches", headers=wrong).status_code == 401
        # upload the weights of the task's checkpoint, then search with them
        up = server.post(
            "/v1/checkpoints", params={"model": "resnet20"},
            content=Path(default_task.checkpoint).read_bytes(),
            headers={**AUTH, "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert up.status_code == 201, up.text
        checkpoint = up.json()["id"]
        body = {**SMALL, "model": {"name": "resnet20", "checkpoint": checkpoint}}
        started = server.post("/v1/searches", json=body)
        assert started.status_code == 202, started.text
        sid = started.json()["id"]
        status = poll(server, sid, lambda s: s["state"] not in ("queued", "running"))
        assert status["state"] == "finished", status
        assert status["progress"] == {"done": 12, "requested": 12}
        assert 0 < status["best_accuracy"] <= 1 and status["cost"]["flops_ratio"] <= 0.5
        policy = server.get(f"/v1/searches/{sid}/policy")
        assert policy.status_code == 200
        # the same policy from the CLI, another process reading MLflow
        cli = subprocess.run(
            [str(BIN / "autoprune"), "best", "--experiment", "service", "--json",
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == policy.json()
        assert policy.json()["fingerprint"]["checkpoint"] == default_task.checkpoint_hash
        listed = server.get("/v1/searches").json()["searches"]
        assert [s["id"] for s in listed] == [sid]
        # bad input: 422 with the field path, 404 for unknown ids, never a 500
        bad = server.post("/v1/searches", json={"model": {"name": "os:system"}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
            "body",
            "model",
            "name",
        ]
        path = server.post("/v1/searches", json={"model": {"checkpoint": "/etc/passwd"}})
        assert path.status_code == 422 and "checkpoint" in path.json()["detail"][0]["loc"]
        unknown = server.post("/v1/searches", json={"search": {"bogus": 1}})
        assert unknown.status_code == 422
        for option in ("warm_start", "save_to"):  # a file read (unpickled) or written here
            named = {"searchers": ["ddpg"], "options": {"ddpg": {option: str(tmp_path / "a")}}}
            refused = server.post("/v1/searches", json={"search": named})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"] == [
                "body", "search", "options", "ddpg", option,
            ]  # fmt: skip
        assert not (tmp_path / "a").exists()
        assert server.get("/v1/searches/0123abc").status_code == 404
        junk = server.post(
            "/v1/checkpoints", params={"model": "resnet20"}, content=b"not a torch file",
            headers={**AUTH, "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert junk.status_code == 422
        # a restart mid-search: the finished search stays finished, the running one resumes
        first = sid
        long = {"search": {**SMALL["search"], "evaluations": 40}}
        sid = server.post("/v1/searches", json=long).json()["id"]
        before = poll(server, sid, lambda s: s["progress"]["done"] >= 10)["progress"]["done"]
    finally:
        server.stop()  # mid-search
    server = Server(tmp_path)
    try:
        server.wait_ready()
        listed = {s["id"]: s for s in server.get("/v1/searches").json()["searches"]}
        assert listed[first]["state"] == "finished"
        assert listed[first]["progress"]["done"] == 12
        assert listed[sid]["state"] == "interrupted"
        assert listed[sid]["progress"]["done"] >= before
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        assert store.get_run(sid).info.status == "KILLED"  # not left RUNNING by the dead service
        assert server.get(f"/v1/searches/{first}/policy").status_code == 200
        resumed = server.post(f"/v1/searches/{sid}/resume")
        assert resumed.status_code == 202, resumed.text
        status = poll(server, sid, lambda s: s["state"] not in ("queued", "running"), 300)
        assert status["state"] == "finished"
        assert status["progress"] == {"done": 40, "requested": 40}
        assert server.post(f"/v1/searches/{first}/resume").status_code == 409
    finally:
        server.stop()


def test_no_token_refuses_a_public_address(tmp_path):
    proc = subprocess.run(
        [str(BIN / "autoprune"), "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "AUTOPRUNE_TOKEN"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in proc.stderr


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("service")
    return create_app(
        Settings(
            token=TOKEN,
            tracking_uri=f"sqlite:///{folder}/mlflow.db",
            state_dir=folder / "state",
            max_concurrent=1,
            limits=Limits(workers=1),
        )
    )


@pytest.mark.timeout(180)
def test_cancel_stops_the_work_within_seconds(app, default_task):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        body = {"search": {**SMALL["search"], "evaluations": 1000, "workers": 1}}
        sid = client.post("/v1/searches", json=body, headers=AUTH).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/searches/{sid}", headers=AUTH).json()["progress"]["done"] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        start = time.perf_counter()
        cancelled = client.delete(f"/v1/searches/{sid}", headers=AUTH)
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        assert time.perf_counter() - start < 10
        done = cancelled.json()["progress"]["done"]
        time.sleep(2)
        after = client.get(f"/v1/searches/{sid}", headers=AUTH).json()
        assert after["state"] == "cancelled" and after["progress"]["done"] == done < 1000
        assert client.delete(f"/v1/searches/{sid}", headers=AUTH).status_code == 409


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(
        token=TOKEN, tracking_uri=f"sqlite:///{folder}/mlflow.db", state_dir=folder / "state"
    )
    return create_app(settings_, start_jobs=False)  # searches are accepted and stay queued


def test_fuzz_the_openapi_schema_finds_no_500(fuzz_app):
    """schemathesis, bounded: no server error and responses that match the schema."""
    api = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    used = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]
    tested = 0
    for result in api.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @schemathesis_given(strategy)
        def run(case) -> None:
            case.call_and_validate(headers=AUTH, checks=used)

        run()
        tested += 1
    assert tested >= 9


def schemathesis_given(strategy):
    from hypothesis import given

    return given(case=strategy)
