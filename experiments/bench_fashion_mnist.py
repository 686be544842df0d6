"""The Fashion-MNIST task (issue 14): checkpoints, search-split fidelity, simple searchers.

1. ``checkpoints``: train (or load from the cache) the default checkpoint of each model on
   Fashion-MNIST at 28x28 and report its training time and test accuracy (10,000 images).
2. ``fidelity``: for random policies at a FLOPs budget, search accuracy (after adaptive BN, no
   fine-tuning) on nested seeded samples of 500 / 1,000 / 2,000 / 5,000 search images, against
   test accuracy on the 10,000 test images: the Pearson correlation per sample size, and the
   evaluator's seconds per policy at each size.
3. ``searchers``: best search accuracy of ``uniform``, ``random`` (30 evaluations) and
   ``sensitivity`` at FLOPs 0.5 and 0.25 on the ResNet-20 checkpoint.

Resumable: results go to ``experiments/results/fashion_mnist.json`` as they are measured
(fidelity policy by policy) and a rerun skips what is there. Needs the IDX files
(``apt-get install dataset-fashion-mnist``).

    python experiments/bench_fashion_mnist.py [--parts checkpoints,fidelity,searchers]
        [--models resnet20] [--policies 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist.json"
SIZES = (500, 1000, 2000, 5000)


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)


def _task(model: str, overrides: list[str] | None = None) -> Any:
    from autoprune import build_task

    return build_task(None, [f"model.name={model}", "data.name=fashion_mnist", "threads=1",
                             *(overrides or [])], progress=True)  # fmt: skip


def checkpoints(models: list[str], results: dict[str, Any], threads: int = 2) -> None:
    from autoprune.config import task_config
    from autoprune.training import default_checkpoint

    done = results.setdefault("checkpoints", {})
    for name in models:
        if name in done:
            continue
        cfg = task_config(None, [f"model.name={name}", "data.name=fashion_mnist"])
        torch.set_num_threads(threads)
        start = time.perf_counter()
        path = default_checkpoint(name, cfg.data, cfg.train, progress=True)
        meta = json.loads(torch.load(path, weights_only=True)["meta"])
        done[name] = {"train_seconds": meta["seconds"], "test_accuracy": meta["test_acc"],
                      "search_accuracy": meta["search_acc"], "epochs": cfg.train.epochs,
                      "wall_seconds_this_run": time.perf_counter() - start}  # fmt: skip
        _save(results)
        print(f"checkpoint {name}: {done[name]}", flush=True)


def _per_image_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([
            (model(xb).argmax(1) == yb).numpy() for xb, yb in zip(x.split(500), y.split(500),
                                                                  strict=True)
        ])  # fmt: skip


def fidelity(policies: int, budget: str, results: dict[str, Any]) -> None:
    from autoprune import Evaluator

    torch.set_num_threads(1)
    task = _task("resnet20")
    bud = task.check_budget(budget)
    rows = results.setdefault("fidelity", {}).setdefault(budget, [])
    rng = np.random.default_rng(0)
    order = task.data.search.head(max(SIZES), seed=task.config.seed)  # what search_images uses
    assert order.x is not None and order.y is not None
    vecs = [task.project(rng.uniform(0, task.space.max_ratio, len(task.space)), bud)
            for _ in range(policies)]  # fmt: skip
    for k in range(len(rows), policies):
        model = task.prune(vecs[k], light=True)
        task.recalibrate(model)
        correct = _per_image_correct(model, order.x, order.y)
        test_acc = task.score(model, "test")[0]
        rows.append({"search": {str(n): float(correct[:n].mean()) for n in SIZES},
                     "test": test_acc, "ratios": vecs[k].tolist()})  # fmt: skip
        _save(results)
        print(f"fidelity {budget} policy {k + 1}/{policies}: test {test_acc:.4f}", flush=True)
    timing = results.setdefault("fidelity_seconds", {})
    for n in SIZES:
        if str(n) in timing:
            continue
        ev = Evaluator(_task("resnet20", [f"eval.search_images={n}"]))
        seconds = [ev.evaluate(v).seconds["total"] for v in vecs[:8]]
        timing[str(n)] = statistics.median(seconds)
        _save(results)


def searchers(results: dict[str, Any]) -> None:
    from autoprune.agents import search

    torch.set_num_threads(1)
    task = _task("resnet20")
    done = results.setdefault("searchers", {})
    for budget in ("flops=0.5", "flops=0.25"):
        for name, evals in (("uniform", None), ("random", 30), ("sensitivity", None)):
            key = f"{name} {budget}"
            if key in done:
                continue
            start = time.perf_counter()
            res = search(name, task, budget, seed=0, evaluations=evals)
            done[key] = {
                "best_search_accuracy": res.best.accuracy,
                "flops_ratio": res.best.flops_ratio,
                "evaluations": len(res.history),
                "seconds": time.perf_counter() - start,
            }
            _save(results)
            print(f"{key}: {done[key]}", flush=True)


def report(results: dict[str, Any]) -> None:
    print("\n| model | epochs | train time | test accuracy |\n|---|---|---|---|")
    for name, r in results.get("checkpoints", {}).items():
        print(f"| {name} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min | "
              f"{100 * r['test_accuracy']:.2f}% |")  # fmt: skip
    for budget, rows in results.get("fidelity", {}).items():
        test = np.array([r["test"] for r in rows])
        print(
            f"\nfidelity at {budget}, {len(rows)} random policies (test accuracy "
            f"{100 * test.min():.1f}-{100 * test.max():.1f}%)"
        )
        print("| search images | Pearson r with test accuracy | seconds / evaluation |")
        print("|---|---|---|")
        for n in SIZES:
            search_acc = np.array([r["search"][str(n)] for r in rows])
            r = float(np.corrcoef(search_acc, test)[0, 1]) if len(rows) > 2 else float("nan")
            secs = results.get("fidelity_seconds", {}).get(str(n))
            print(f"| {n} | {r:.4f} | {secs:.2f} |" if secs else f"| {n} | {r:.4f} | |")
    if results.get("searchers"):
        print("\n| searcher | budget | best search accuracy | evaluations | seconds |")
        print("|---|---|---|---|---|")
        for key, r in results["searchers"].items():
            name, budget = key.split(" ")
            print(f"| {name} | {budget} | {100 * r['best_search_accuracy']:.2f}% | "
                  f"{r['evaluations']} | {r['seconds']:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="checkpoints,fidelity,searchers")
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--policies", type=int, default=100)
    parser.add_argument("--budget", default="flops=0.5")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args()
    results = _load()
    parts = args.parts.split(",")
    if "checkpoints" in parts:
        checkpoints(args.models.split(","), results, args.threads)
    if "fidelity" in parts:
        fidelity(args.policies, args.budget, results)
    if "searchers" in parts:
        searchers(results)
    report(results)


if __name__ == "__main__":
    main()
