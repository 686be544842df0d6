"""Benchmark of the core hot paths on the embedded default task (ResNet-20 on digits).

Measures: the evaluator's time per policy at a 25% FLOPs budget, split into prune / BN
recalibration / accuracy, for 1 and 2 torch threads; the analytic cost model's time per call;
and the training time and test accuracy of the default checkpoint (trained from scratch in a
temporary cache, unless --skip-train).

    python experiments/bench_core.py [--policies 50] [--skip-train]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_training() -> None:
    from autoprune.config import DataConfig, TrainConfig
    from autoprune.data import load_data
    from autoprune.models import build_model, load_checkpoint
    from autoprune.training import default_checkpoint, evaluate_accuracy

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = default_checkpoint("resnet20", DataConfig(), TrainConfig(), cache_dir=Path(tmp))
        seconds = time.perf_counter() - start
        data = load_data(DataConfig())
        model = load_checkpoint(build_model("resnet20", 1, 10), path)
        acc, _ = evaluate_accuracy(model, data.x_test, data.y_test)
    cfg = TrainConfig()
    print(
        f"default checkpoint: resnet20/digits, {cfg.epochs} epochs, "
        f"trained in {seconds:.1f} s, test accuracy {100 * acc:.2f}% ({len(data.y_test)} images)"
    )


def bench_evaluator(policies: int, threads: int) -> None:
    import autoprune as ap

    torch.set_num_threads(threads)
    task = ap.build_task()
    budget = task.check_budget("flops=0.25")
    rng = np.random.default_rng(0)
    vecs = [task.project(rng.uniform(0, 0.8, len(task.units)), budget) for _ in range(policies)]
    evaluator = ap.Evaluator(task)
    evaluator.evaluate(vecs[0])  # warm-up (allocator, lazy ranking)
    evaluator = ap.Evaluator(task)  # a fresh cache: every policy below is really evaluated
    results = [evaluator.evaluate(v) for v in vecs]
    parts = ("prune", "recalibrate", "accuracy", "costs", "total")
    med = {p: 1e3 * statistics.median(r.seconds[p] for r in results) for p in parts}
    flops = statistics.mean(r.flops_ratio for r in results)
    print(
        f"evaluator, {threads} thread(s), {policies} policies at FLOPs<=0.25 "
        f"(mean achieved {flops:.3f}), search split {len(task.data.y_search)} images, "
        f"BN recalibration {task.config.eval.bn_batches}x{task.config.eval.bn_batch_size}:"
    )
    print("  median ms: " + ", ".join(f"{p} {med[p]:.1f}" for p in parts))

    n = 20000
    start = time.perf_counter()
    for i in range(n):
        task.space.costs(vecs[i % policies])
    cost_us = 1e6 * (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n // 10):
        task.project(rng.uniform(0, 0.8, len(task.units)), budget)
    proj_us = 1e6 * (time.perf_counter() - start) / (n // 10)
    print(f"  analytic cost: {cost_us:.1f} us per call; exact budget projection {proj_us:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    print(
        f"# bench_core  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  "
        f"{platform.machine()}  {os.cpu_count()} cores"
    )
    if not args.skip_train:
        bench_training()
    for threads in (1, 2):
        bench_evaluator(args.policies, threads)


if __name__ == "__main__":
    main()
