"""The searchers' quality bar (issue 16): does ``ddpg`` beat random, evolutionary, sensitivity and
greedy search at equal evaluations?

Default task: ResNet-20 on Fashion-MNIST at 28x28 (the checkpoint that ships in
experiments/checkpoints, else the cached default one), channel
granularity, l2, adaptive BN. For each budget, searcher and seed: best search-split accuracy;
test accuracy (the official 10,000 test images) of the best policy with adaptive BN only and
after the same fine-tune for all; evaluations needed to reach sensitivity's search accuracy; the
mean of the last 50 evaluations; achieved FLOPs; wall time; and, for equal wall time, each
episodic searcher's best within the shortest episodic searcher's wall time of that seed. Then
mean ± std over seeds, and a verdict per budget computed from the rows (the issue's targets).

Resumable: every finished (budget, searcher, seed) is appended to ``<out>.jsonl`` at once and
skipped by a rerun; the tables (``<out>.md``) are rebuilt from that file. Every row records the
digest of the checkpoint it searched and the code revision; a run whose model is not the one of
the file's rows is refused before it searches (write to another ``--out``).

    python experiments/bench_search.py [--data fashion_mnist] [--budgets flops=0.5 flops=0.25]
        [--searchers ddpg random evolution netadapt sensitivity uniform global]
        [--seeds 0 1 2 3 4] [--evaluations 300] [--finetune-epochs 2] [--finetune-batches N]
        [--workers 2]
        [--variant LABEL=SEARCHER:key=value,...] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from autoprune.agents import SEARCHERS, get_searcher, search

import autoprune as ap
from autoprune.evaluate import EvaluationMemo
from autoprune.parallel import make_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_revision  # this folder's module

DETERMINISTIC = ("netadapt", "sensitivity", "uniform", "global")  # run for the first seed only
OUT = Path("experiments/results/bench_search_fmnist")


def with_shipped_checkpoint(model: str, data: str, overrides: list[str]) -> list[str]:
    """``overrides`` plus ``model.checkpoint=`` the weights that ship in experiments/checkpoints
    for this model and data set, unless the overrides name a checkpoint: every machine then
    measures the same model (two trainings by one recipe on two machines differ)."""
    shipped = Path(__file__).resolve().parent / "checkpoints" / f"{model}-{data}.pt"
    if any(o.startswith("model.checkpoint=") for o in overrides) or not shipped.is_file():
        return list(overrides)
    return [*overrides, f"model.checkpoint={shipped}"]


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``ddpg-loss=ddpg:reward=loss,sigma=0.5`` -> (label, searcher, options)."""
    label, _, rest = spec.partition("=")
    searcher, _, opts = rest.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    return label, searcher, options


def test_accuracy(
    task: ap.Task,
    ratios: dict[str, float],
    epochs: int,
    batches: int | None = None,
    threads: int | None = None,
) -> tuple[float, float]:
    """Test accuracy of a policy with adaptive BN only, and after ``epochs`` of fine-tuning,
    each capped at ``batches`` (with every core by default: the Ray workers are idle between
    searches)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        result = ap.apply_policy(task, ratios, finetune_epochs=epochs, latency=False,
                                 finetune_batches=batches)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return result.pruned_no_finetune["test_accuracy"], result.after["test_accuracy"]


def fresh_memo(backend: Any) -> None:
    """Forget earlier searches' evaluations: each search pays for its own (equal wall time)."""
    size = backend.task.config.eval.cache_size
    if hasattr(backend, "memo"):  # Ray: the driver's memo
        backend.memo = EvaluationMemo(size)
    if getattr(backend, "evaluator", None) is not None:  # serial
        backend.evaluator.memo = EvaluationMemo(size)


def run_one(
    task: ap.Task,
    backend: Any,
    budget: str,
    label: str,
    seed: int,
    evaluations: int,
    epochs: int,
    variants: dict[str, tuple[str, dict[str, Any]]],
    batches: int | None = None,
    threads: int | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    name, options = variants.get(label, (label, {}))
    cls = get_searcher(name)
    kwargs: dict[str, Any] = {}
    if cls.needs_evaluations or name == "netadapt":  # a budget, or netadapt's limit
        kwargs["evaluations"] = evaluations
    fresh_memo(backend)
    start = time.perf_counter()
    result = search(name, task, budget, seed=seed, backend=backend, **kwargs, **options)
    wall = time.perf_counter() - start
    assert result.best is not None, f"{label} found nothing within {budget}"
    before, after = test_accuracy(task, result.best_ratios, epochs, batches, threads)
    full = [r for r in result.history if not r.partial]
    return {
        "budget": budget,
        "searcher": label,
        "seed": seed,
        "best_search": result.best.accuracy,
        "test_before": before,
        "test_after": after,
        "last50": float(np.mean([r.accuracy for r in full[-50:]])) if full else None,
        "options": options,
        "finetune": {"epochs": epochs, "batches": batches},
        "flops": result.best.flops_ratio,
        "best_ratios": result.best_ratios,
        "evaluations": result.evaluations,
        "partial": sum(r.partial for r in result.history),
        "cached": sum(r.cached for r in result.history),
        "wall": wall,
        "checkpoint": task.checkpoint_hash,  # the model searched (a digest of its weights)
        "revision": revision,  # the code that searched
        # (elapsed s, accuracy, counts as a best) per evaluation, for curves and equal wall time
        "history": [
            [round(r.elapsed, 3), r.accuracy, bool(r.meets_budget and not r.partial)]
            for r in result.history
        ],
    }


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoint(rows: list[dict[str, Any]], digest: str, log: Path) -> None:
    """Refuse to add rows measured on another model: every row of a file is compared with every
    other, and two trainings of one recipe are two models. Rows that predate the digest pass."""
    other = sorted({r["checkpoint"] for r in rows if r.get("checkpoint") not in (None, digest)})
    if other:
        raise SystemExit(
            f"{log} holds rows measured on checkpoint {', '.join(other)}, this run's model is "
            f"{digest}: write to another --out, or name the recorded checkpoint with "
            f"--set model.checkpoint=PATH"
        )


def provenance_note(rows: list[dict[str, Any]]) -> str:
    """One line: the checkpoints and code revisions the rows were measured with."""

    def count(key: str) -> str:
        seen: dict[str, int] = {}
        for r in rows:
            value = r.get(key) or "not recorded"
            seen[value] = seen.get(value, 0) + 1
        return ", ".join(f"{v} ({n} rows)" for v, n in seen.items())

    return f"Checkpoint: {count('checkpoint')}. Code: {count('revision')}."


def mean_std(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = statistics.mean(vals) * scale
    s = statistics.pstdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def best_within(row: dict[str, Any], seconds: float | None = None) -> float | None:
    """Best search accuracy among the evaluations finished within ``seconds`` (all: None)."""
    accs = [a for t, a, ok in row["history"] if ok and (seconds is None or t <= seconds)]
    return max(accs) if accs else None


def reach(row: dict[str, Any], target: float | None) -> str:
    if target is None:
        return "-"
    for i, (_, acc, ok) in enumerate(row["history"], 1):
        if ok and acc >= target:
            return str(i)
    return "never"


def _std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def fine_tuned(row: dict[str, Any]) -> bool:
    """Whether the row's test_after is after a fine-tune (rows that predate the record were)."""
    return bool(row.get("finetune", {}).get("epochs", 1))


def verdict(rows: list[dict[str, Any]], agent: str = "ddpg") -> list[str]:
    """The issue's targets, checked on the rows of one budget."""
    names = dict.fromkeys(r["searcher"] for r in rows)
    by = {n: [r for r in rows if r["searcher"] == n] for n in names}
    if agent not in by:
        return [f"- no `{agent}` rows"]
    mean = {n: statistics.mean(r["test_before"] for r in rs) for n, rs in by.items()}
    tuned = all(fine_tuned(r) for r in rows)
    ft = {n: statistics.mean(r["test_after"] for r in rs) for n, rs in by.items()}
    others = [n for n in by if n != agent]
    out = []
    best_other = max(others, key=lambda n: mean[n]) if others else None
    if best_other is not None:
        ok = mean[agent] > mean[best_other]
        out.append(
            f"- test accuracy without fine-tuning: `{agent}` {100 * mean[agent]:.2f}% vs the best "
            f"other, `{best_other}`, {100 * mean[best_other]:.2f}%: **{'met' if ok else 'missed'}**"
        )
    for rival in ("random", "evolution"):
        if rival not in by:
            continue
        spread = max(_std([r["test_before"] for r in by[agent]]),
                     _std([r["test_before"] for r in by[rival]]))  # fmt: skip
        lead = mean[agent] - mean[rival]
        ok = lead > spread and len(by[agent]) > 1
        out.append(
            f"- lead over `{rival}` (no FT): {100 * lead:+.2f} points against a seed spread of "
            f"{100 * spread:.2f} ({len(by[agent])} seeds): **{'met' if ok else 'missed'}**"
        )
    if not tuned:
        out.append(
            "- fine-tune targets: not checked, not every row was fine-tuned (--finetune-epochs 0)"
        )
        return out
    if others:
        worst_gap = max(ft[n] - ft[agent] for n in others)
        ok = worst_gap <= 0.002
        out.append(
            f"- after the same fine-tune, at most 0.2 points below any other: largest gap "
            f"{100 * worst_gap:+.2f} points: **{'met' if ok else 'missed'}**"
        )
    if "uniform" in by:
        lead = ft[agent] - ft["uniform"]
        out.append(
            f"- after fine-tune, >= 0.5 above `uniform`: {100 * lead:+.2f} points: "
            f"**{'met' if lead >= 0.005 else 'missed'}**"
        )
    return out


def table(rows: list[dict[str, Any]], agent: str = "ddpg") -> str:
    lines: list[str] = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        mine = [r for r in rows if r["budget"] == budget]
        sens = [r["best_search"] for r in mine if r["searcher"] == "sensitivity"]
        target = sens[0] if sens else None
        episodic = [r for r in mine if r["searcher"] not in DETERMINISTIC]
        seeds = sorted({r["seed"] for r in episodic})
        # equal wall time: each episodic row's best within the fastest episodic row of its seed
        horizon = {s: min(r["wall"] for r in episodic if r["seed"] == s) for s in seeds}
        lines += [
            f"\n#### {budget}\n",
            "| searcher | seeds | best search acc % | test acc % (no FT) | test acc % (FT) "
            "| best at equal wall time % | evals to sensitivity's acc | last-50 mean % "
            "| FLOPs ratio | evaluations (partial) | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r["searcher"] for r in mine):
            rs = [r for r in mine if r["searcher"] == name]
            equal = [best_within(r, horizon[r["seed"]]) for r in rs if r["seed"] in horizon
                     and name not in DETERMINISTIC]  # fmt: skip
            partial = sum(r["partial"] for r in rs) / len(rs)
            lines.append(
                f"| {name} | {len(rs)} | {mean_std([r['best_search'] for r in rs])} "
                f"| {mean_std([r['test_before'] for r in rs])} "
                f"| {mean_std([r['test_after'] if fine_tuned(r) else None for r in rs])} "
                f"| {mean_std(equal)} "
                f"| {', '.join(reach(r, target) for r in rs)} "
                f"| {mean_std([r['last50'] for r in rs])} "
                f"| {mean_std([r['flops'] for r in rs], 1, 3)} "
                f"| {mean_std([r['evaluations'] for r in rs], 1, 0)} ({partial:.0f}) "
                f"| {mean_std([r['wall'] for r in rs], 1, 0)} |"
            )
        lines += ["", "Verdict (computed from the rows above):", *verdict(mine, agent)]
    return "\n".join(lines)


def best_so_far(row: dict[str, Any]) -> list[float]:
    """Best full, within-budget search accuracy after each evaluation (nan before the first)."""
    out, best = [], float("nan")
    for _, acc, ok in row["history"]:
        if ok and not best >= acc:
            best = acc
        out.append(best)
    return out


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Learning curves: best search accuracy so far vs evaluations, mean over seeds (the band:
    min to max), one panel per budget; one-shot searchers as a point where they ended."""
    from matplotlib.figure import Figure

    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    names = list(dict.fromkeys(r["searcher"] for r in rows))
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour a searcher, every panel
    fig = Figure(figsize=(6 * len(budgets), 4.5))
    for i, budget in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), i + 1)
        mine = [r for r in rows if r["budget"] == budget]
        for name in dict.fromkeys(r["searcher"] for r in mine):
            runs = [best_so_far(r) for r in mine if r["searcher"] == name]
            length = min(len(c) for c in runs)
            values = 100 * np.array([c[:length] for c in runs])
            if np.isfinite(values).any(axis=0).sum() > 1:  # a curve, not one final point
                x = np.arange(1, length + 1)
                with warnings.catch_warnings():  # columns before any seed's first full result
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, lo, hi = (f(values, axis=0) for f in (np.nanmean, np.nanmin, np.nanmax))
                ax.plot(x, mean, label=f"{name} ({len(runs)})", color=color[name])
                ax.fill_between(x, lo, hi, alpha=0.15, color=color[name])
            else:
                ax.plot([length], [np.nanmean(values[:, -1])], "o", label=f"{name} (final)",
                        color=color[name])  # fmt: skip
        ax.set_title(f"{budget}: best search accuracy so far")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("%")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say which rows to run (this script's and bench_search_pool.py's)."""
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--budgets", nargs="+", default=["flops=0.5", "flops=0.25"])
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_row_arguments(parser)
    parser.add_argument("--searchers", nargs="+", default=["ddpg", "random", "evolution",
                        "netadapt", "sensitivity", "uniform", "global"])  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-batches", type=int, default=None,
                        help="cap each fine-tune epoch at this many batches")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (0: serial)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra row LABEL=SEARCHER:key=value,... (list LABEL in --searchers)",
    )
    parser.add_argument("--agent", default="ddpg", help="the row the verdict judges")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="task config override, e.g. data.search_size=2000")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables only")
    args = parser.parse_args()  # fmt: skip
    variants = {label: (name, opts) for label, name, opts in map(parse_variant, args.variant)}
    unknown = sorted(set(args.searchers) - set(SEARCHERS) - set(variants))
    if unknown:
        raise SystemExit(f"unknown searchers {unknown}; choose from {sorted(SEARCHERS)}")
    log = args.out.with_suffix(".jsonl")
    rows = _load(log)
    if not args.table_only:
        torch.set_num_threads(1)
        args.set = with_shipped_checkpoint(args.model, args.data, args.set)
        task = ap.build_task(
            None, [f"model.name={args.model}", f"data.name={args.data}", *args.set], progress=True
        )
        for budget in args.budgets:
            task.check_budget(budget)  # every budget reachable, before anything runs
        check_checkpoint(rows, task.checkpoint_hash, log)
        revision = code_revision()  # the code this process imported, not a later commit
        done = {(r["budget"], r["searcher"], r["seed"]) for r in rows}
        print(f"# bench_search {time.strftime('%Y-%m-%d %H:%M')}: {args.model}/{args.data}, "
              f"{args.evaluations} evaluations, seeds {args.seeds}, fine-tune "
              f"{args.finetune_epochs} epochs, {args.workers} Ray workers; {len(done)} rows "
              f"already in {log}", flush=True)  # fmt: skip
        with make_backend(task, args.workers) as backend:
            for budget in args.budgets:
                for seed in args.seeds:
                    for label in args.searchers:
                        name = variants.get(label, (label, {}))[0]
                        if name in DETERMINISTIC and seed != args.seeds[0]:
                            continue
                        if (budget, label, seed) in done:
                            continue
                        row = run_one(task, backend, budget, label, seed, args.evaluations,
                                      args.finetune_epochs, variants,
                                      args.finetune_batches, revision=revision)  # fmt: skip
                        with log.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        rows.append(row)
                        print(
                            f"  {budget} {label:12s} seed {seed}: best "
                            f"{100 * row['best_search']:.2f}%  test "
                            f"{100 * row['test_before']:.2f}% -> {100 * row['test_after']:.2f}% "
                            f"FT  FLOPs {row['flops']:.3f}  {row['evaluations']} evals "
                            f"({row['partial']} partial)  {row['wall']:.0f} s",
                            flush=True,
                        )
    text = table(rows, args.agent)
    print(text)
    args.out.with_suffix(".md").write_text(provenance_note(rows) + "\n" + text + "\n")
    if rows:
        plot_curves(rows, args.out.with_name(args.out.name + "_curves.png"))


if __name__ == "__main__":
    main()
