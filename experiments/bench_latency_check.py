"""The clock check of latency searches (``search.latency_check``), measured on real models.

For each model of the benchmark plan (its shipped checkpoint, Fashion-MNIST at 28x28, latency at
batch 64 as the plan's budget), one search at ``--budget`` that trusts the lookup table
(``latency_check=0``), then :func:`autoprune.runner.latency_check.check_latency_on_clock` on
its result with ``--check`` policies (the default of a search). Both policies, the table's best
and the one the check returns, are then timed again in a separate, longer interleaved
measurement with the dense model (median of ``--repeats``: an independent timing, not the
check's own), and scored on the 10,000 test images (adaptive BN, no fine-tune).

Rows are appended to ``--out`` (default ``experiments/results``: ``latency_check.jsonl``) as
each model finishes, and a model already there is skipped (resumable); the report is
``experiments/results/latency_check.md``. Run it on a quiet machine: it is a timing.

    python experiments/bench_latency_check.py --models resnet20,resnet56,vgg11,mobilenetv2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from autoprune.apply import apply_policy, latency_ratios
from autoprune.bench.data import ensure_data
from autoprune.bench.plan import Narrowing, load_plan
from autoprune.budget import Budget
from autoprune.runner.config import LATENCY_CHECK
from autoprune.runner.experiment import run_experiment
from autoprune.runner.latency_check import check_latency_on_clock

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", type=Path, default=HERE / "benchmark.yaml")
    p.add_argument("--models", default="resnet20,resnet56,vgg11,mobilenetv2")
    p.add_argument("--budget", default="latency=0.6")
    p.add_argument("--searcher", default="random")
    p.add_argument("--evaluations", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", type=int, default=LATENCY_CHECK)
    p.add_argument("--repeats", type=int, default=50, help="rounds of the independent timing")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if "latency" not in Budget.parse(args.budget).metrics:
        p.error(f"--budget {args.budget} has no latency limit: there is nothing to check")
    if args.check < 1 or args.evaluations < 1 or args.repeats < 1:
        p.error("--check, --evaluations and --repeats must be >= 1")
    return args


def _group(args: argparse.Namespace, model: str) -> tuple[Any, Any]:
    """The benchmark plan's group of ``model`` at ``--budget`` (one searcher, one seed)."""
    narrowing = Narrowing(
        models=[model],
        budgets=[args.budget],
        searchers=[args.searcher],
        seeds=[args.seed],
        evaluations=args.evaluations,
        no_extra=True,
    )
    plan = load_plan(args.plan, narrowing)
    problem = ensure_data(plan)
    if problem is not None:
        raise SystemExit(f"error: {problem}")
    return plan, plan.groups[0]


def measure(args: argparse.Namespace, model: str) -> dict[str, Any]:
    plan, group = _group(args, model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = plan.config(group, f"sqlite:///{tmp}/mlflow.db")
        search = cfg.search.model_copy(update={"latency_check": 0, "finetune_epochs": 0})
        cfg = cfg.model_copy(update={"search": search})
        t0 = time.perf_counter()
        experiment = run_experiment(cfg)
        search_s = time.perf_counter() - t0
    task = experiment.task
    assert task is not None
    outcome = experiment.outcomes[0]
    result = outcome.result
    assert result is not None and result.best is not None
    table_best = result.best
    t0 = time.perf_counter()
    check = check_latency_on_clock(task, result, Budget.parse(args.budget), args.check)
    check_s = time.perf_counter() - t0
    assert check is not None
    chosen = result.best
    vecs = [task.ratio_vector(table_best.ratios), task.ratio_vector(chosen.ratios)]
    retimed = latency_ratios(task, vecs, repeats=args.repeats)
    tests = [apply_policy(task, v, latency=False).pruned_no_finetune["test_accuracy"] for v in vecs]
    return {
        "model": model, "budget": args.budget, "searcher": args.searcher, "seed": args.seed,
        "evaluations": result.evaluations, "check": args.check,
        "latency_batch": task.config.eval.latency_batch_size,
        "table_best": {"table": check["searched_table"], "measured": check["searched_measured"],
                       "retimed": retimed[0], "search_accuracy": table_best.accuracy,
                       "test_accuracy": tests[0]},
        "returned": {"table": check["table"], "measured": check["measured"],
                     "retimed": retimed[1], "search_accuracy": chosen.accuracy,
                     "test_accuracy": tests[1]},
        "met": check["met"], "replaced": check["replaced"], "timed": check["timed"],
        "search_s": search_s, "check_s": check_s,
        "when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# The clock check of latency searches",
        "",
        f"`python experiments/bench_latency_check.py --budget {args.budget} --searcher "
        f"{args.searcher} --evaluations {args.evaluations} --check {args.check}`: one search per "
        'model that trusts the lookup table, then the check on its result. "measured" is the '
        'check\'s timing; "retimed" a separate interleaved timing with the dense model (median '
        f"of {args.repeats}); test accuracy on the 10,000 test images, no fine-tune.",
        "",
        "| model | policy | table ratio | measured | retimed | search acc | test acc | meets on "
        "the clock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    limit = Budget.parse(args.budget).limits["latency"]
    for r in rows:
        for name, key in (("table's best", "table_best"), ("returned", "returned")):
            p = r[key]
            if key == "returned" and not r["replaced"]:
                lines.append(f"| {r['model']} | returned | the same policy |  |  |  |  |  |")
                continue
            ok = "yes" if p["retimed"] <= limit else "no"
            lines.append(
                f"| {r['model']} | {name} | {p['table']:.3f} | {p['measured']:.3f} | "
                f"{p['retimed']:.3f} | {100 * p['search_accuracy']:.1f} | "
                f"{100 * p['test_accuracy']:.1f} | {ok} |"
            )
    lines += ["", "| model | policies timed | check s | search s | when |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['timed']} | {r['check_s']:.1f} | "
                     f"{r['search_s']:.0f} | {r['when']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "latency_check.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if any(r["model"] == model and r["budget"] == args.budget for r in rows):
            print(f"{model}: already measured, skipped", flush=True)
            continue
        print(f"{model}: searching ({args.searcher}, {args.evaluations} evaluations)", flush=True)
        row = measure(args, model)
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    (args.out / "latency_check.md").write_text(report(rows, args))
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
