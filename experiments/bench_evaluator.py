"""The evaluator against its floor: how close one policy evaluation is to the forward passes
it cannot avoid.

The *floor* of an evaluation is the forward passes it needs through the pruned model: the BN
recalibration images (train mode, no gradients) and the search-split images (eval mode, under
``torch.inference_mode``), nothing else — no pruning surgery, no loss, no bookkeeping. The
evaluator's time is ``Evaluator.evaluate`` on a policy it has not seen (no memo hit). Both are
timed on the same projected random policies, one thread, alternating, so that a busy machine
slows both alike; medians are reported.

Levers, each measured as a variant of the evaluator's own settings:

* ``batch=N``: the accuracy batch size (``eval.batch_size``);
* ``bn=N``: fewer recalibration batches (``eval.bn_batches``; its fidelity cost is measured by
  ``experiments/bench_fashion_mnist.py --parts fidelity``);
* and, timed on the floor itself for every row: the search pass under ``torch.no_grad``
  instead of ``inference_mode``, and the pruned model and images in channels-last format.

    python experiments/bench_evaluator.py [--tasks fashion_mnist,digits] [--policies 12]
        [--budgets flops=0.5,flops=0.25] [--variants default,batch=1000,...]

Results go to ``experiments/results/evaluator_floor.json`` (one entry per task x budget x
variant, skipped when rerun) and are printed as a table; the README's "The evaluator against its
floor" quotes them.
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

RESULTS = Path(__file__).resolve().parent / "results" / "evaluator_floor.json"
TASKS = {
    "fashion_mnist": ["data.name=fashion_mnist", "threads=1"],
    "digits": ["threads=1"],
}
VARIANTS = ("default", "batch=256", "batch=1000", "batch=2500", "bn=2")


def _floor(model: torch.nn.Module, bn_images: torch.Tensor, bn_batch: int, search: list[Any],
           batch: int, grad_mode: Any = torch.inference_mode) -> float:  # fmt: skip
    """Seconds of the forward passes alone: recalibration batches, then the search split."""
    start = time.perf_counter()
    if len(bn_images):
        model.train()
        with torch.no_grad():
            for xb in bn_images.split(bn_batch):
                model(xb)
    model.eval()
    with grad_mode():
        for xb in search:
            model(xb)
    return time.perf_counter() - start


def _policies(task: Any, budget: Any, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [task.project(rng.uniform(0, task.space.max_ratio, len(task.space)), budget)
            for _ in range(n)]  # fmt: skip


def _inputs(task: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The images an evaluation runs through the pruned model, as the evaluator draws them: the
    recalibration sample of the training split (``eval.bn_batches`` x ``eval.bn_batch_size``,
    seeded by the task's seed) and the search split in batches of ``eval.batch_size``."""
    cfg = task.config.eval
    n = cfg.bn_batches * cfg.bn_batch_size
    bn = task.data.subset("train", n, seed=task.config.seed)[0] if n else torch.zeros(0)
    search = task.search_split.map(lambda t: t.to(task.device))
    return bn.to(task.device), [xb for xb, _ in search.batches(cfg.batch_size)]


def measure(task_name: str, budget_text: str, variant: str, n: int) -> dict[str, Any]:
    from autoprune import build_task
    from autoprune.evaluate import Evaluator

    overrides = list(TASKS[task_name])
    if variant.startswith("batch="):
        overrides.append(f"eval.batch_size={variant.split('=')[1]}")
    if variant.startswith("bn="):
        overrides.append(f"eval.bn_batches={variant.split('=')[1]}")
    task = build_task(None, overrides)
    torch.set_num_threads(1)
    budget = task.check_budget(budget_text)
    evaluator = Evaluator(task)
    cfg = task.config.eval
    policies = _policies(task, budget, n + 1, seed=1)
    evaluator.evaluate(policies[0])  # warm-up (first-call allocations, lazy imports)
    bn_images, search = _inputs(task)
    search_cl = [xb.contiguous(memory_format=torch.channels_last) for xb in search]
    bn_cl = bn_images.contiguous(memory_format=torch.channels_last)
    evals, floors, floors_ng, floors_cl = [], [], [], []
    parts: dict[str, list[float]] = {"prune": [], "recalibrate": [], "accuracy": []}
    for vec in policies[1:]:
        result = evaluator.evaluate(vec)
        evals.append(result.seconds["total"])
        for key in parts:
            parts[key].append(result.seconds[key])
        model = task.prune(vec, light=True)
        bn, size = bn_images, cfg.bn_batch_size
        floors.append(_floor(model, bn, size, search, cfg.batch_size))
        floors_ng.append(_floor(model, bn, size, search, cfg.batch_size, torch.no_grad))
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        floors_cl.append(_floor(model, bn_cl, size, search_cl, cfg.batch_size))
    ev, fl = statistics.median(evals), statistics.median(floors)
    return {
        "task": task_name, "budget": budget_text, "variant": variant, "policies": n,
        "search_images": len(task.search_split), "bn_images": len(bn_images),
        "evaluator_s": ev, "floor_s": fl, "ratio": ev / fl,
        "floor_no_grad_s": statistics.median(floors_ng),
        "floor_channels_last_s": statistics.median(floors_cl),
        **{f"{k}_s": statistics.median(v) for k, v in parts.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="fashion_mnist,digits")
    parser.add_argument("--budgets", default="flops=0.5,flops=0.25")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--policies", type=int, default=12)
    parser.add_argument("--fresh", action="store_true", help="ignore recorded results")
    args = parser.parse_args()
    done: dict[str, Any] = {}
    if RESULTS.is_file() and not args.fresh:
        done = json.loads(RESULTS.read_text())
    for task_name in args.tasks.split(","):
        for budget in args.budgets.split(","):
            for variant in args.variants.split(","):
                key = f"{task_name} {budget} {variant}"
                if key in done:
                    continue
                done[key] = measure(task_name, budget, variant, args.policies)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(done, indent=1))
                r = done[key]
                print(f"{key}: evaluator {r['evaluator_s']:.3f} s, floor {r['floor_s']:.3f} s, "
                      f"x{r['ratio']:.2f}", flush=True)  # fmt: skip
    print(
        "\n| task | budget | variant | search imgs | BN imgs | evaluator s | floor s | ratio "
        "| prune s | recalibrate s | accuracy s | floor, no_grad s | floor, channels-last s |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in done.values():
        print(f"| {r['task']} | {r['budget']} | {r['variant']} | {r['search_images']} | "
              f"{r['bn_images']} | {r['evaluator_s']:.3f} | {r['floor_s']:.3f} | "
              f"{r['ratio']:.2f} | {r['prune_s']:.3f} | {r['recalibrate_s']:.3f} | "
              f"{r['accuracy_s']:.3f} | {r['floor_no_grad_s']:.3f} | "
              f"{r['floor_channels_last_s']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
