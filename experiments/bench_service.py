"""Throughput of the service under status polling, and what that load costs a running search.

Starts ``autoprune serve`` (a token, sqlite MLflow in a temporary folder), runs the same search
twice (random, ResNet-20/digits, FLOPs <= 0.5, 1 Ray worker): once alone, once while 20
concurrent clients poll ``GET /v1/searches/{id}`` as fast as they can. Reports requests per
second, latency percentiles and the search time of each run (MLflow's ``search_seconds``).

    python experiments/bench_service.py [--evaluations 300] [--clients 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

TOKEN = "bench-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not start")


def run_search(url: str, evaluations: int) -> tuple[str, float]:
    body = {
        "search": {
            "searchers": ["random"],
            "budget": "flops=0.5",
            "evaluations": evaluations,
            "workers": 1,
        }
    }
    sid = httpx.post(f"{url}/v1/searches", json=body, headers=HEADERS, timeout=30).json()["id"]
    t0 = time.perf_counter()
    while True:
        state = httpx.get(f"{url}/v1/searches/{sid}", headers=HEADERS, timeout=30).json()
        if state["state"] == "running":
            break
        time.sleep(0.05)
    return sid, t0


def finished(url: str, sid: str) -> bool:
    state = httpx.get(f"{url}/v1/searches/{sid}", headers=HEADERS, timeout=30).json()["state"]
    if state in ("failed", "cancelled", "interrupted"):
        raise SystemExit(f"search {sid} {state}")
    return bool(state == "finished")


def search_seconds(folder: Path, sid: str) -> float:
    from autoprune.tracking.tracker import TrackingStore

    store = TrackingStore(f"sqlite:///{folder}/mlflow.db")
    (child,) = store.child_runs(sid)
    return float(child["metrics"]["search_seconds"])


async def load(url: str, sid: str, clients: int) -> tuple[int, float, list[float]]:
    """Poll the search's status from ``clients`` concurrent clients until it finishes."""
    latencies: list[float] = []
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            r = await http.get(f"/v1/searches/{sid}")
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise SystemExit(f"status {r.status_code}: {r.text}")
            if r.json()["state"] == "finished":
                stop.set()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return len(latencies), wall, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="niceness of the load generator (it shares this machine's cores with the search; "
        "real clients run elsewhere)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-service-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AUTOPRUNE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).parent / "autoprune"), "serve", "--port", str(port),
        "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--max-concurrent", "1",
    ]  # fmt: skip
    log = (folder / "server.log").open("wb")
    server = subprocess.Popen(
        cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait(url)
        print(
            f"# bench_service  {datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  "
            f"{os.cpu_count()} cores; random search, {args.evaluations} evaluations, 1 Ray worker"
        )
        warm, _ = run_search(url, 10)  # start Ray and the default checkpoint's cache
        while not finished(url, warm):
            time.sleep(0.2)
        quiet, _ = run_search(url, args.evaluations)
        while not finished(url, quiet):
            time.sleep(0.5)  # a light poll, as a user would
        busy, _ = run_search(url, args.evaluations)
        if args.client_nice:
            os.nice(args.client_nice)
        count, wall, lat = asyncio.run(load(url, busy, args.clients))
        alone, loaded = search_seconds(folder, quiet), search_seconds(folder, busy)
        lat_ms = sorted(1e3 * x for x in lat)
        p = lambda q: lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))]  # noqa: E731
        print(
            f"GET /v1/searches/{{id}} with {args.clients} concurrent clients (nice "
            f"{args.client_nice}) while the search runs: {count} requests in {wall:.1f} s = "
            f"{count / wall:.0f} requests/s; latency "
            f"median {statistics.median(lat_ms):.1f} ms, p95 {p(0.95):.1f} ms, "
            f"p99 {p(0.99):.1f} ms"
        )
        print(
            f"search time: alone {alone:.1f} s, under that load {loaded:.1f} s "
            f"({100 * (loaded / alone - 1):+.1f}%)"
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
