"""Ray-parallel evaluation: same results as serial, every evaluation despite dead workers, clear
errors from the model, DDPG on Ray sub-environments, and joining a cluster by address."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from autoprune.agents import search

from autoprune import build_task
from autoprune.parallel import (
    EvaluationError,
    RayBackend,
    SerialBackend,
    make_backend,
)

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pool(default_task, ray_session):
    backend = RayBackend(default_task, workers=2)
    yield backend
    backend.close()


def summary(result):
    return [
        (r.index, r.ratios, r.accuracy, r.loss, r.flops_ratio, r.meets_budget)
        for r in result.history
    ]


def test_map_matches_serial_and_caches(default_task, pool):
    rng = np.random.default_rng(0)
    vecs = [rng.uniform(0, 0.6, len(default_task.space)) for _ in range(5)]
    vecs.append(vecs[1].copy())  # a repeat: answered from the driver's cache
    serial = SerialBackend(default_task).map(vecs)
    ray_out = pool.map(vecs)
    for a, b in zip(serial, ray_out, strict=True):
        assert (a.accuracy, a.loss, a.ratios, a.macs) == (b.accuracy, b.loss, b.ratios, b.macs)
    assert ray_out[-1].cached and not ray_out[1].cached
    assert len(set(pool.pids())) == 2


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("uniform", {}),
        ("random", {"evaluations": 10}),
        ("evolution", {"evaluations": 10, "population": 4, "parents": 2}),
        ("sensitivity", {"grid": (0.4, 0.8)}),
        ("netadapt", {"evaluations": 12, "finetune_batches": 2, "r0": 0.1}),
    ],
)
def test_serial_and_ray_give_identical_results(default_task, pool, name, options):
    evaluations = options.pop("evaluations", None)
    args = (name, default_task, "flops=0.6")
    serial = search(*args, seed=3, evaluations=evaluations, **options)
    parallel = search(*args, seed=3, evaluations=evaluations, backend=pool, **options)
    assert summary(serial) == summary(parallel)
    assert serial.best is not None and serial.best_ratios == parallel.best_ratios


def test_dead_workers_are_replaced_and_nothing_is_lost(default_task, pool):
    expected = search("random", default_task, "flops=0.5", seed=7, evaluations=24)
    restarts = pool.restarts

    def sabotage(record, _result):
        if record.index == 4:  # between calls: Ray kills the actor
            import ray

            ray.kill(pool.actors[0], no_restart=True)
        if record.index == 12:  # mid-evaluation: the worker process is killed
            pid = pool.pids()[1]
            threading.Timer(0.02, os.kill, (pid, signal.SIGKILL)).start()

    got = search(
        "random", default_task, "flops=0.5", seed=7, evaluations=24, callback=sabotage,
        backend=pool,
    )  # fmt: skip
    assert [r.index for r in got.history] == list(range(1, 25))
    assert summary(got) == summary(expected)
    assert pool.restarts >= restarts + 2


@pytest.mark.timeout(120)
def test_an_error_in_the_model_names_the_policy(ray_session):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = build_task()
    classifier = dict(task.model.named_modules())[task.space.classifier]
    classifier.register_forward_hook(fail_on_batches)
    backend = RayBackend(task, workers=1)
    try:
        vec = np.full(len(task.space), 0.25)
        start = time.perf_counter()
        with pytest.raises(EvaluationError, match=r"evaluating policy \{.*=0\.250.*boom"):
            backend.map([vec])
        assert time.perf_counter() - start < 60
    finally:
        backend.close()


def fail_on_batches(_module, inputs, _output):
    """A user's model that breaks on real batches (tracing uses one image and survives)."""
    if inputs[0].shape[0] > 1:
        raise RuntimeError("boom: the user's model failed")


def test_ddpg_with_two_ray_subenvironments_records_every_episode(default_task, ray_session):
    backend = RayBackend(default_task, workers=2)
    try:
        result = search(
            "ddpg", default_task, "flops=0.5", seed=0, evaluations=9, backend=backend,
            warmup_episodes=4, batch_size=16,
        )  # fmt: skip
    finally:
        backend.close()
    assert result.info["n_envs"] == 2
    assert [r.index for r in result.history] == list(range(1, 10))
    assert all(r.meets_budget and r.flops_ratio <= 0.5 + 1e-9 for r in result.history)
    assert len({tuple(r.ratios.values()) for r in result.history}) > 5  # real episodes
    assert result.best is not None


def test_bad_worker_settings_fail_before_any_work(default_task):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        make_backend(default_task, workers=-1)
    with pytest.raises(ValueError, match="ray_address needs workers"):
        make_backend(default_task, workers=0, ray_address="auto")
    with pytest.raises(Exception, match="unknown searcher"):
        search("nope", default_task, "flops=0.5", workers=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(240)
def test_join_an_existing_cluster_by_address():
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # Token authentication, as on a real cluster: the same token on the head and the driver.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
            "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
            "--temp-dir", temp,
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import ray
        from autoprune import build_task
        from autoprune.agents import search
        task = build_task()
        result = search("random", task, "flops=0.5", seed=1, evaluations=6, workers=2,
                        ray_address="127.0.0.1:{port}")
        print("GCS", ray.get_runtime_context().gcs_address)
        print("EVALUATIONS", result.evaluations)
        """
    )
    try:
        out = run_when_ready(script, port, env)
        assert f"GCS 127.0.0.1:{port}" in out or f":{port}" in out.split("GCS", 1)[1]
        assert "EVALUATIONS 6" in out
    finally:
        stop_process_group(head)
    assert not accepts_connections(port), "the head still listens after it was stopped"
    shutil.rmtree(temp, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (``ray start --block`` and what it started), then SIGKILL."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def accepts_connections(port: int, wait: float = 10.0) -> bool:
    """Whether 127.0.0.1:port still accepts connections ``wait`` seconds from now at the latest."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return False
        time.sleep(0.5)
    return True


def run_when_ready(script: str, port: int, env: dict[str, str]) -> str:
    """Run ``script`` once the head accepts connections (it takes a few seconds to start)."""
    deadline = time.monotonic() + 90
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "the Ray head did not start within 90 s"
        time.sleep(0.5)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_unreachable_cluster_is_a_clear_error():
    # One Ray connection per process (the session's is open): check in a fresh process.
    script = textwrap.dedent(
        f"""
        from autoprune import build_task
        from autoprune.parallel import RayBackend, ParallelError
        try:
            RayBackend(build_task(), workers=1, ray_address="127.0.0.1:{free_port()}")
        except ParallelError as err:
            print("ERROR", err)
        """
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert "ERROR cannot start or reach the Ray cluster at 127.0.0.1" in proc.stdout, proc.stderr
    assert time.perf_counter() - start < 90
