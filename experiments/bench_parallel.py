"""Throughput of the evaluation backends on ResNet-20 (digits, or Fashion-MNIST with ``--task
fashion_mnist``): serial (both cores), Ray 1 and 2.

For each backend: plain evaluations per second (a batch of distinct random policies at FLOPs
<= 0.25, as random search makes them) and NetAdapt proposals per second (two iterations of
proposals, each pruning, fine-tuning 10 batches and evaluating). Ray's overhead per evaluation is
the wall time per evaluation with one actor minus the evaluation time measured inside the actor,
and a no-op actor call's round trip. Ray start-up and actor start-up are not timed.

    python experiments/bench_parallel.py [--evaluations 80] [--cores 2]
    python experiments/bench_parallel.py --task fashion_mnist --evaluations 16 --iterations 0

Evaluations here are always in full (``eval.reject`` off): throughput of the backends, not of
early rejection. The table is printed; the recorded runs are
``experiments/results/bench_parallel.md`` (and the README's "Ray on real evaluations").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime

import numpy as np
import ray
import torch
from autoprune.agents.netadapt import NetAdaptSearcher
from autoprune.envs import PruningEnv

import autoprune as ap
from autoprune.parallel import Backend, RayBackend, SerialBackend, init_ray

BUDGET = "flops=0.25"


def random_policies(task: ap.Task, n: int, seed: int = 0) -> list[np.ndarray]:
    env = PruningEnv(task, BUDGET)
    rng = np.random.default_rng(seed)
    return [env.rollout(rng.uniform(-1, 1, len(task.space))) for _ in range(n)]


def plain(backend: Backend, vecs: list[np.ndarray]) -> tuple[float, float]:
    """Evaluations per second, and the mean evaluation time measured where it ran (ms)."""
    t0 = time.perf_counter()
    out = backend.map(vecs)
    wall = time.perf_counter() - t0
    assert not any(e.cached for e in out)
    return len(vecs) / wall, 1e3 * statistics.mean(e.seconds["total"] for e in out)


def netadapt(task: ap.Task, backend: Backend, iterations: int) -> float:
    """NetAdapt proposals per second over about ``iterations`` iterations (10-batch fine-tunes,
    r0 0.02, decay 0.98): a search with an evaluation budget of one iteration's proposals per
    unit and iteration, plus the final projected evaluation it keeps back."""
    units = len(task.space)
    options = {"finetune_batches": 10, "r0": 0.02, "decay": 0.98}
    evaluations = iterations * units + 1
    searcher = NetAdaptSearcher(
        task, BUDGET, seed=0, backend=backend, evaluations=evaluations, **options
    )
    t0 = time.perf_counter()
    result = searcher.run()
    wall = time.perf_counter() - t0
    return result.evaluations / wall


def round_trip_ms(backend: RayBackend, calls: int = 200) -> float:
    actor = backend.actors[0]
    ray.get(actor.pid.remote())
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ray.get(actor.pid.remote())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=80)
    parser.add_argument("--iterations", type=int, default=2, help="NetAdapt iterations")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--task", default="digits", choices=["digits", "fashion_mnist"])
    args = parser.parse_args()

    torch.set_num_threads(1)
    overrides = ["eval.reject=false"]
    if args.task == "fashion_mnist":
        overrides.append("data.name=fashion_mnist")
    task = ap.build_task(None, overrides)
    units = len(task.space)
    vecs = random_policies(task, args.evaluations)
    warm = random_policies(task, 2, seed=1)  # warm-up policies, never timed
    print(
        f"# bench_parallel  {datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
        f"ray {ray.__version__}  {platform.machine()}  {args.cores} cores"
    )
    print(
        f"resnet20/{args.task}, {units} units, {BUDGET}: {args.evaluations} plain evaluations "
        f"(distinct random policies), NetAdapt {args.iterations} iterations x {units} proposals "
        f"(10-batch fine-tune each)"
    )
    rows = []
    # Serial: the calling process, torch using every core, then one thread.
    serial = SerialBackend(task)
    for threads in (args.cores, 1):
        torch.set_num_threads(threads)
        serial.evaluator.memo = type(serial.evaluator.memo)(0)  # measure, never answer cached
        serial.map(warm)  # first-call allocations
        eps, inside = plain(serial, vecs)
        proposals = netadapt(task, serial, args.iterations) if args.iterations else float("nan")
        rows.append((f"serial, {threads} thread(s)", threads, eps, inside, proposals))
    torch.set_num_threads(1)

    init_ray(args.cores)
    overhead = {}
    for workers in (1, 2):
        backend = RayBackend(task, workers=workers)
        backend.pids()  # start the actors (and their tasks) before timing
        backend.map(warm)
        eps, inside = plain(backend, vecs)
        proposals = netadapt(task, backend, args.iterations) if args.iterations else float("nan")
        rows.append((f"ray x{workers}", backend.threads, eps, inside, proposals))
        if workers == 1:
            overhead = {
                "wall_minus_inside": 1e3 / eps - inside,
                "round_trip": round_trip_ms(backend),
            }
        backend.close()

    base_eps, base_prop = rows[0][2], rows[0][4]
    print(
        "| backend | torch threads / worker | evaluations/s | ms per evaluation (in worker) "
        "| x serial | NetAdapt proposals/s | x serial |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, threads, eps, inside, prop in rows:
        print(
            f"| {name} | {threads} | {eps:.1f} | {inside:.1f} | {eps / base_eps:.2f} "
            f"| {prop:.2f} | {prop / base_prop:.2f} |"
        )
    print(
        f"Ray overhead per evaluation (1 worker): {overhead['wall_minus_inside']:.1f} ms "
        f"(wall per evaluation minus time inside the actor); no-op actor call round trip "
        f"{overhead['round_trip']:.2f} ms"
    )


if __name__ == "__main__":
    main()
