"""NetAdapt's schedule on the default task: run time and quality of (r0, decay) choices.

The default task (ResNet-20 on digits, channel, l2, FLOPs <= 0.25) searched by ``netadapt``
with each ``r0,decay`` given; for each: evaluations, wall time, iterations, the best policy's
search accuracy, and its test accuracy after adaptive BN and after the same short fine-tune.
Results are appended to ``experiments/results/netadapt_schedule.json`` as each setting
finishes (a rerun skips settings already there), then printed as a table.

    python experiments/bench_netadapt.py [--settings 0.02,0.98 0.1,0.96] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from autoprune.agents import search

import autoprune as ap
from autoprune.runner.experiment import test_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "netadapt_schedule.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["0.02,0.98", "0.05,0.97", "0.1,0.96"])
    parser.add_argument("--budget", default="flops=0.25")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    done: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    task = ap.build_task(None, ["threads=1"], progress=True)
    for setting in args.settings:
        key = f"{args.budget} r0,decay={setting}"
        if key in done:
            continue
        r0, decay = (float(x) for x in setting.split(","))
        start = time.perf_counter()
        result = search("netadapt", task, args.budget, seed=0, r0=r0, decay=decay)
        seconds = time.perf_counter() - start
        assert result.best is not None
        test = test_metrics(task, result.best_ratios, args.finetune_epochs)
        done[key] = {
            "r0": r0, "decay": decay, "evaluations": result.evaluations, "seconds": seconds,
            "iterations": len(result.info.get("iterations", [])),
            "search_accuracy": result.best.accuracy, "flops_ratio": result.best.flops_ratio,
            **test,
        }  # fmt: skip
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(done, indent=1))
        print(key, done[key], flush=True)
    where = f"{task.config.model.name}/{task.data.name}, {args.budget}"
    print(f"\nnetadapt on {where}, seed 0, one thread; test accuracy after "
          f"{args.finetune_epochs} fine-tune epoch(s)\n")  # fmt: skip
    print("| r0 | decay | evaluations | iterations | wall time | search acc | test acc (BN) "
          "| test acc (fine-tuned) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for key, r in done.items():
        if key.startswith(args.budget):
            print(f"| {r['r0']} | {r['decay']} | {r['evaluations']} | {r['iterations']} | "
                  f"{r['seconds']:.0f} s | {r['search_accuracy']:.4f} | {r['test_accuracy']:.4f} "
                  f"| {r.get('test_accuracy_finetuned', float('nan')):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
