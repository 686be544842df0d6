"""bench_search's rows on a machine with many cores (or a GPU): one whole search per process.

``bench_search.py`` runs its searches one after the other, each spread over Ray workers (what a
2-core machine affords). Here every worker process builds the task once (one torch thread, the
serial evaluator; ``--set device=cuda`` puts the model and the search images on a GPU) and runs
whole (budget, searcher, seed) searches taken from a queue, seed by seed, so that an interrupted
run holds complete seeds. The parent appends each finished row to ``<out>.jsonl`` at once (the
rows and tables of ``bench_search.py``: ``bench_search.py --out <out> --table-only`` reads them)
and skips rows already there. ``--deadline-s`` (or ``--deadline-at``) stops handing out
searches after that long and lets the running ones finish; ``--kill-after-s`` ends the ones
still running then (their rows are lost; the finished ones are kept).

    python experiments/bench_search_pool.py --processes 16 --budgets flops=0.5 flops=0.25 \
        --searchers ddpg random evolution --seeds 0 1 2 3 4 --evaluations 300 \
        --finetune-epochs 0 --set device=cuda --deadline-s 480 --out /tmp/pilot
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as bs  # this folder's script

_WORKER: dict[str, Any] = {}


def _init(model: str, data: str, overrides: list[str], revision: str | None = None) -> None:
    """One task and serial backend per worker process, one torch thread."""
    import torch

    import autoprune as ap
    from autoprune.parallel import make_backend

    torch.set_num_threads(1)
    task = ap.build_task(None, [f"model.name={model}", f"data.name={data}", *overrides])
    _WORKER.update(task=task, backend=make_backend(task, 0), revision=revision)


def _job(args: tuple[Any, ...]) -> dict[str, Any]:
    budget, label, seed, evaluations, epochs, batches, variants = args
    return bs.run_one(_WORKER["task"], _WORKER["backend"], budget, label, seed, evaluations,
                      epochs, variants, batches, threads=1,
                      revision=_WORKER["revision"])  # fmt: skip


def smoke(model: str, data: str, overrides: list[str], budget: str) -> tuple[float, str]:
    """Seconds for one evaluation of the uniform policy (the task built in this process), and the
    checkpoint's digest."""
    import torch
    from autoprune.agents import search

    import autoprune as ap

    torch.set_num_threads(1)
    task = ap.build_task(None, [f"model.name={model}", f"data.name={data}", *overrides])
    search("uniform", task, budget)  # warm-up: first-call costs
    start = time.perf_counter()
    result = search("uniform", task, budget)
    assert result.best is not None
    print(f"# smoke: {task.device}, uniform at {budget}: {100 * result.best.accuracy:.2f}% "
          f"search accuracy, {time.perf_counter() - start:.2f} s", flush=True)  # fmt: skip
    return time.perf_counter() - start, task.checkpoint_hash


def jobs(args: argparse.Namespace, done: set[tuple[str, str, int]]) -> list[tuple[Any, ...]]:
    variants = {label: (name, opts) for label, name, opts in map(bs.parse_variant, args.variant)}
    out = []
    for seed in args.seeds:
        for budget in args.budgets:
            for label in args.searchers:
                name = variants.get(label, (label, {}))[0]
                if name in bs.DETERMINISTIC and seed != args.seeds[0]:
                    continue
                if (budget, label, seed) in done:
                    continue
                out.append((budget, label, seed, args.evaluations, args.finetune_epochs,
                            args.finetune_batches, variants))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bs.add_row_arguments(parser)
    parser.add_argument("--searchers", nargs="+", default=["ddpg", "random", "evolution"])
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--finetune-batches", type=int, default=None)
    parser.add_argument("--processes", type=int, default=mp.cpu_count())
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra row LABEL=SEARCHER:key=value,... (list LABEL in --searchers)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--cpu-fallback",
        action="store_true",
        help="if the smoke evaluation fails (e.g. no CUDA), drop device=",
    )
    parser.add_argument("--deadline-s", type=float, default=None, help="seconds from the start")
    parser.add_argument("--deadline-at", type=float, default=None, help="a Unix time")
    parser.add_argument(
        "--kill-after-s",
        type=float,
        default=None,
        help="end the searches still running this long after the start",
    )
    parser.add_argument("--agent", default="ddpg")
    parser.add_argument("--out", type=Path, default=bs.OUT)
    args = parser.parse_args()  # fmt: skip
    if args.processes < 1:
        raise SystemExit("--processes must be >= 1")
    start = time.perf_counter()
    if args.deadline_at is not None:  # one clock for both: seconds from this start
        until = args.deadline_at - time.time()
        args.deadline_s = until if args.deadline_s is None else min(args.deadline_s, until)
    overrides = bs.with_shipped_checkpoint(args.model, args.data, list(args.set))
    try:
        _, digest = smoke(args.model, args.data, overrides, args.budgets[0])
    except Exception:
        traceback.print_exc()
        if not args.cpu_fallback:
            raise SystemExit("the smoke evaluation failed") from None
        overrides = [o for o in overrides if not o.startswith("device=")]
        print("# smoke failed: falling back to the CPU", flush=True)
        _, digest = smoke(args.model, args.data, overrides, args.budgets[0])
    log = args.out.with_suffix(".jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = bs._load(log)
    bs.check_checkpoint(rows, digest, log)
    todo = jobs(args, {(r["budget"], r["searcher"], r["seed"]) for r in rows})
    print(f"# bench_search_pool {time.strftime('%Y-%m-%d %H:%M')}: {len(todo)} searches on "
          f"{args.processes} processes, overrides {overrides}", flush=True)  # fmt: skip
    pool = ProcessPoolExecutor(args.processes, mp.get_context("spawn"), _init,
                               (args.model, args.data, overrides,
                                bs.code_revision()))  # fmt: skip
    running: dict[Future[dict[str, Any]], tuple[Any, ...]] = {}
    try:
        while todo or running:
            late = args.deadline_s is not None and time.perf_counter() - start > args.deadline_s
            while todo and not late and len(running) < args.processes:
                job = todo.pop(0)
                running[pool.submit(_job, job)] = job
            if not running:
                break
            elapsed = time.perf_counter() - start
            if late and todo:
                print(f"# deadline: {len(todo)} searches not started", flush=True)
                todo = []
            kill = args.kill_after_s
            if kill is not None and elapsed >= kill:
                print(f"# kill-after: {len(running)} searches ended unfinished", flush=True)
                break
            # wake at the deadline too, to stop handing out searches
            marks = [t - elapsed for t in (args.deadline_s, kill) if t is not None and t > elapsed]
            finished, _ = wait(running, timeout=min(marks, default=None),
                               return_when=FIRST_COMPLETED)  # fmt: skip
            for fut in finished:
                job = running.pop(fut)
                try:
                    row = fut.result()
                except Exception:
                    traceback.print_exc()
                    print(f"# failed: {job[:3]}", flush=True)
                    continue
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                print(f"  {row['budget']} {row['searcher']:14s} seed {row['seed']}: best "
                      f"{100 * row['best_search']:.2f}%  test {100 * row['test_before']:.2f}%  "
                      f"FLOPs {row['flops']:.3f}  {row['evaluations']} evals "
                      f"({row['partial']} partial)  {row['wall']:.0f} s  "
                      f"[{time.perf_counter() - start:.0f} s]", flush=True)  # fmt: skip
    finally:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    text = bs.table(rows, args.agent)
    print(text)
    args.out.with_suffix(".md").write_text(bs.provenance_note(rows) + "\n" + text + "\n")
    if rows:
        bs.plot_curves(rows, args.out.with_name(args.out.name + "_curves.png"))


if __name__ == "__main__":
    main()
