"""The quality bar of the searchers: ResNet-20 on digits, channel, l2, adaptive BN, FLOPs <= 0.25.

For each searcher and seed: best search-split accuracy, test accuracy of the best policy before
and after the same short fine-tune, the mean search accuracy of the last 50 episodes (ddpg,
random), the evaluations needed to first reach random search's final best, the achieved FLOPs
ratio and the wall time; then mean and spread (std) over seeds.

    python experiments/bench_search.py [--evaluations 300] [--seeds 0 1 2] [--finetune-epochs 5]
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
import yaml
from autoprune.agents import SEARCHERS, search

import autoprune as ap
from autoprune.training import evaluate_accuracy, recalibrate_bn

EPISODIC = ("ddpg", "random")  # searchers that take an evaluation budget


def test_accuracy(task: ap.Task, ratios: dict[str, float], finetune_epochs: int) -> tuple:
    """Test accuracy of a policy with adaptive BN only, and after a short fine-tune."""
    model = task.prune(ratios)
    cfg = task.config.eval
    recalibrate_bn(model, task.data.x_train, cfg.bn_batches, cfg.bn_batch_size)
    before, _ = evaluate_accuracy(model, task.data.x_test, task.data.y_test)
    result = ap.apply_policy(task, ratios, finetune_epochs=finetune_epochs, latency=False)
    return before, result.after["test_accuracy"]


def first_reaching(history: list, target: float) -> int | None:
    for rec in history:
        if rec.meets_budget and rec.accuracy >= target:
            return int(rec.index)
    return None


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``ddpg-slow=ddpg:sigma=0.3,sigma_decay=0.98`` -> (label, searcher, options)."""
    label, _, rest = spec.partition("=")
    searcher, _, opts = rest.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    return label, searcher, options


def run(
    task: ap.Task,
    label: str,
    seed: int,
    evaluations: int,
    epochs: int,
    variants: dict[str, tuple[str, dict[str, Any]]],
) -> dict[str, Any]:
    name, options = variants.get(label, (label, {}))
    kwargs: dict[str, Any] = {"evaluations": evaluations} if name in EPISODIC else {}
    start = time.perf_counter()
    result = search(name, task, "flops=0.25", seed=seed, **kwargs, **options)
    wall = time.perf_counter() - start
    assert result.best is not None
    before, after = test_accuracy(task, result.best_ratios, epochs)
    accs = [r.accuracy for r in result.history]
    return {
        "searcher": label,
        "seed": seed,
        "best_search": result.best.accuracy,
        "test_before": before,
        "test_after": after,
        "last50": float(np.mean(accs[-50:])) if name in EPISODIC else None,
        "options": options,
        "flops": result.best.flops_ratio,
        "evaluations": result.evaluations,
        "wall": wall,
        "history": accs,
        "valid": [r.meets_budget for r in result.history],
    }


def mean_std(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = statistics.mean(vals) * scale
    s = statistics.pstdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(rows: list[dict[str, Any]], dense_test: float) -> str:
    random_best = {r["seed"]: r["best_search"] for r in rows if r["searcher"] == "random"}
    lines = [
        "| searcher | best search acc % | test acc % (no FT) | test acc % (FT) | last-50 mean % "
        "| evals to random's best | FLOPs ratio | evaluations | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["searcher"] for r in rows):
        mine = [r for r in rows if r["searcher"] == name]
        reach = []
        for r in mine:
            target = random_best.get(r["seed"])
            if target is not None:
                hist = [
                    i + 1
                    for i, (a, ok) in enumerate(zip(r["history"], r["valid"], strict=True))
                    if ok and a >= target
                ]
                reach.append(str(hist[0]) if hist else "never")
        lines.append(
            f"| {name} | {mean_std([r['best_search'] for r in mine])} "
            f"| {mean_std([r['test_before'] for r in mine])} "
            f"| {mean_std([r['test_after'] for r in mine])} "
            f"| {mean_std([r['last50'] for r in mine])} | {', '.join(reach) or '-'} "
            f"| {mean_std([r['flops'] for r in mine], 1, 3)} "
            f"| {mean_std([r['evaluations'] for r in mine], 1, 0)} "
            f"| {mean_std([r['wall'] for r in mine], 1, 0)} |"
        )
    lines.append(f"\nUnpruned model: test accuracy {100 * dense_test:.1f}%.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--searchers", nargs="+", default=["random", "ddpg", "netadapt",
                        "uniform", "sensitivity", "global"])  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra row LABEL=SEARCHER:key=value,... (list LABEL in --searchers)",
    )
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_search"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {label: (name, opts) for label, name, opts in map(parse_variant, args.variant)}
    unknown = sorted(set(args.searchers) - set(SEARCHERS) - set(variants))
    if unknown:
        raise SystemExit(f"unknown searchers {unknown}; choose from {sorted(SEARCHERS)}")
    task = ap.build_task()
    dense_test, _ = evaluate_accuracy(task.model, task.data.x_test, task.data.y_test)
    print(
        f"# bench_search {time.strftime('%Y-%m-%d %H:%M')}: resnet20/digits, channel, l2, "
        f"FLOPs<=0.25, {args.evaluations} evaluations (ddpg, random), seeds {args.seeds}, "
        f"fine-tune {args.finetune_epochs} epochs, search split {len(task.data.y_search)}"
    )
    rows = []
    for seed in args.seeds:
        for name in args.searchers:
            row = run(task, name, seed, args.evaluations, args.finetune_epochs, variants)
            rows.append(row)
            print(
                f"  {name:12s} seed {seed}: best {100 * row['best_search']:.1f}%  test "
                f"{100 * row['test_before']:.1f}% -> {100 * row['test_after']:.1f}% after FT  "
                f"FLOPs {row['flops']:.3f}  {row['evaluations']} evals  {row['wall']:.0f} s",
                flush=True,
            )
    text = table(rows, dense_test)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
