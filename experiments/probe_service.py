"""The service from outside (issue 17): requests an attacker or a careless client would send,
what each got, the service's memory on an unauthenticated 40 MB body, and the memory of the
whole service (its process tree: HTTP, Ray, launches) under 2 concurrent searches, the number
of Ray clusters they use, and what a ``SIGKILL`` of the service leaves running before and after
the service is started again.

Starts ``autoprune serve`` (a token, sqlite MLflow in a temporary folder) and prints a table of
request categories with the status codes they got, then the memory figures.

    python experiments/probe_service.py [--evaluations 150]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

TOKEN = "probe-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    from autoprune.service.reaper import descendants as below

    return below(pid)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def ray_processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command) of every Ray process on this machine (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmd.startswith("ray::") or "/ray/" in cmd:
            ppid = int(text[text.rfind(")") + 2 :].split()[1])
            out.append((int(stat.parent.name), ppid, cmd.split()[0].rsplit("/", 1)[-1]))
    return out


def start_service(folder: Path, port: int, log: Any) -> subprocess.Popen:
    env = {**os.environ, "AUTOPRUNE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "autoprune"), "serve", "--port", str(port),
         "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--max-concurrent", "2"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the service did not start")
        time.sleep(0.5)


def probes(url: str) -> list[tuple[str, str, Any]]:
    """(category, request, status) for every request tried."""
    out: list[tuple[str, str, Any]] = []

    def post(body: Any = None, content: bytes | None = None, headers: dict | None = None) -> int:
        h = {**JSON, **(AUTH if headers is None else headers)}
        r = httpx.post(f"{url}/v1/searches", json=body, content=content, headers=h, timeout=60)
        return r.status_code

    no = {}
    out.append(("authentication", "no token, GET /v1/searches",
                httpx.get(f"{url}/v1/searches", timeout=30).status_code))  # fmt: skip
    wrong = {"Authorization": "Bearer nope"}
    r = httpx.get(f"{url}/v1/searches", headers=wrong, timeout=30)
    out.append(("authentication", "wrong token", r.status_code))
    out.append(("authentication", "malformed JSON, no token", post(content=b"{nope", headers=no)))
    out.append(("body size", "1 MB JSON body with the token", post(content=b" " * 2**20)))
    out.append(("non-finite", "NaN in options", post(
        content=b'{"search": {"options": {"ddpg": {"sigma": NaN}}}}')))  # fmt: skip
    out.append(("non-finite", "Infinity in eval", post(
        content=b'{"eval": {"reject_z": Infinity}}')))  # fmt: skip
    oversized = {
        "finetune_epochs: 10**9": {"search": {"finetune_epochs": 10**9}},
        "net_arch: [100000, 100000]": {"search": {"options": {"ddpg": {
            "net_arch": [100000, 100000]}}}},
        "buffer_size: 10**12": {"search": {"options": {"ddpg": {"buffer_size": 10**12}}}},
        "netadapt.finetune_batches: 10**9": {"search": {"options": {"netadapt": {
            "finetune_batches": 10**9}}}},
        "eval.bn_batches: 10**9": {"eval": {"bn_batches": 10**9}},
        "threads: 10**6": {"threads": 10**6},
        "evaluations x seeds: 2000 x 12": {"search": {
            "searchers": ["random"], "evaluations": 2000, "seeds": list(range(12))}},
    }  # fmt: skip
    for name, body in oversized.items():
        out.append(("option limits", name, post(body)))
    former = {
        'seeds: "abc"': {"search": {"options": {"random": {"seeds": "abc"}}}},
        "seeds: []": {"search": {"options": {"random": {"seeds": []}}}},
        "unknown searcher in options": {"search": {"options": {"bogus": {}}}},
    }
    for name, body in former.items():
        out.append(("former 500s", name, post(body)))
    before_launch = {
        "ddpg, 50 evaluations < warm-up 100": {"search": {"searchers": ["ddpg"],
                                                          "evaluations": 50}},
        "netadapt on fine granularity": {"granularity": "fine", "criterion": "magnitude",
                                         "search": {"searchers": ["netadapt"]}},
        "device: cuda (none here)": {"device": "cuda"},
        "budget flops=0.01 (unreachable)": {"search": {"budget": "flops=0.01"}},
    }  # fmt: skip
    for name, body in before_launch.items():
        out.append(("checked before 202", name, post(body)))
    files = {
        "ddpg warm_start: a server file": {"search": {"options": {"ddpg": {
            "warm_start": "/etc/passwd"}}}},
        "ddpg save_to: a server path": {"search": {"options": {"ddpg": {
            "save_to": "/tmp/x.zip"}}}},
        "model.checkpoint: a server path": {"model": {"checkpoint": "/etc/passwd"}},
        "model.name: an import string": {"model": {"name": "os:system"}},
    }  # fmt: skip
    for name, body in files.items():
        out.append(("files and code", name, post(body)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=150)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="autoprune-probe-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("wb")
    proc = start_service(folder, port, log)
    try:
        print(f"# probe_service {time.strftime('%Y-%m-%d %H:%M')}  pid {proc.pid}\n")
        print("| category | request | status |\n|---|---|---|")
        for category, request, status in probes(url):
            print(f"| {category} | {request} | {status} |", flush=True)

        idle = tree_rss(proc.pid)
        body = b" " * (40 * 2**20)
        r = httpx.post(f"{url}/v1/searches", content=body, headers=JSON, timeout=120)
        after = tree_rss(proc.pid)
        print(f"\n40 MB body without a token: {r.status_code}; service tree RSS {idle / 2**20:.0f}"
              f" MB before, {after / 2**20:.0f} MB after")  # fmt: skip

        search = {"search": {"searchers": ["random"], "budget": "flops=0.5",
                             "evaluations": args.evaluations, "workers": 1}}  # fmt: skip
        ids = [httpx.post(f"{url}/v1/searches", json=search, headers=AUTH, timeout=60).json()["id"]
               for _ in range(2)]  # fmt: skip
        peak, stop = [idle], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        clusters = 0
        while True:
            mine = set(descendants(proc.pid))  # the service's own tree, not other jobs' Ray
            clusters = max(clusters, sum(c == "gcs_server" for p, _, c in ray_processes()
                                         if p in mine))  # fmt: skip
            states = [httpx.get(f"{url}/v1/searches/{i}", headers=AUTH, timeout=60).json()["state"]
                      for i in ids]  # fmt: skip
            if all(s not in ("queued", "running") for s in states):
                break
            time.sleep(1)
        stop.set()
        sampler.join()
        print(f"2 concurrent searches ({args.evaluations} random evaluations each, 1 Ray worker"
              f" each): {states}, {time.perf_counter() - start:.0f} s; service tree RSS idle "
              f"{idle / 2**20:.0f} MB, peak {peak[0] / 2**20:.0f} MB; Ray clusters (GCS "
              f"servers below the service) at most {clusters}")  # fmt: skip

        # A crash: SIGKILL of the service alone, then a new start on the same store.
        httpx.post(f"{url}/v1/searches", json=search, headers=AUTH, timeout=60)
        time.sleep(15)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(10)
        left = [f"{c} (pid {p})" for p, pp, c in ray_processes() if pp == 1]
        print(f"\nafter SIGKILL of the service: Ray processes left running: {left or 'none'}")
        proc = start_service(folder, port, log)
        time.sleep(2)
        left = [f"{c} (pid {p})" for p, pp, c in ray_processes() if pp == 1]
        print(f"after the service started again: orphaned Ray processes: {left or 'none'}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    main()
