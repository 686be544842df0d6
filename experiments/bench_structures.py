"""Channel pruning on every dependency structure of the test zoo (issue 13).

For each test-zoo structure (``tests/structures.py``) and each built-in zoo model, at 1x16x16:
whether channel pruning is supported or refused (and why), the number of units, the time to
build the pruning space and to run the build-time equivalence check, the largest masking-
equivalence error over random policies at several budget levels, whether analytic MACs and
params equal the measured ones, and the evaluator's time per policy on a real task (digits
resized to 16x16, 500 search images, one thread).

    python experiments/bench_structures.py [--policies 20] [--evaluations 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from structures import REFUSED, SHAPE, STRUCTURES, build  # noqa: E402

from autoprune.costs.measure import count_params, measure_macs  # noqa: E402
from autoprune.engine.equivalence import masked_reference, verify_channel_pruning  # noqa: E402
from autoprune.models import MODELS, build_model  # noqa: E402
from autoprune.engine.pruning import Ranking, prune_model  # noqa: E402
from autoprune.engine.space import PruningSpace, SpaceError  # noqa: E402


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in STRUCTURES or name in REFUSED:
        return build(arch=name).eval()
    return build_model(name, 1, 10).eval()


def _engine_row(name: str, policies: int) -> dict:
    model = _model(name)
    t0 = time.perf_counter()
    try:
        space = PruningSpace(model, SHAPE, "channel")
        t1 = time.perf_counter()
        verify_channel_pruning(model, space)
    except SpaceError as err:
        return {"model": name, "status": "refused", "why": str(err)[:160]}
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = torch.randn(8, *SHAPE)
    worst, costs_exact = 0.0, True
    for k in range(policies):
        level = (0.25, 0.5, 1.0)[k % 3] * space.max_ratio
        ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
        ratios = rng.uniform(0, level, len(space))
        pruned = prune_model(model, space, ranking, ratios).eval()
        ref = masked_reference(model, space, ranking, space.removed_counts(ratios))
        with torch.no_grad():
            worst = max(worst, float((pruned(x) - ref(x)).abs().max()))
        macs, params = space.costs(ratios)
        costs_exact &= measure_macs(pruned, SHAPE) == round(macs)
        costs_exact &= count_params(pruned) == params
    return {
        "model": name,
        "status": "supported",
        "units": len(space),
        "params": sum(p.numel() for p in model.parameters()),
        "build_ms": 1e3 * (t1 - t0),
        "verify_ms": 1e3 * (t2 - t1),
        "max_err": worst,
        "costs_exact": costs_exact,
    }


def _evaluator_ms(name: str, evaluations: int, folder: Path) -> tuple[float, float]:
    """(task build seconds, median evaluator milliseconds per policy) on digits at 16x16."""
    from autoprune import build_task
    from autoprune.evaluate import Evaluator

    ckpt = folder / f"{name}.pt"
    torch.save(_model(name).state_dict(), ckpt)
    factory = "structures:build" if name in STRUCTURES else name
    kwargs = {"arch": name} if name in STRUCTURES else {}
    config = {
        "model": {"name": factory, "kwargs": kwargs, "checkpoint": str(ckpt)},
        "data": {"resize": 16, "search_size": 500},
        "threads": 1,
    }
    t0 = time.perf_counter()
    task = build_task(config)
    built = time.perf_counter() - t0
    evaluator = Evaluator(task)
    rng = np.random.default_rng(1)
    times = []
    for _ in range(evaluations):
        result = evaluator.evaluate(rng.uniform(0, task.space.max_ratio, len(task.space)))
        times.append(1e3 * result.seconds["total"])
    return built, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--evaluations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = sorted(STRUCTURES) + sorted(REFUSED) + sorted(MODELS)
    print(
        "| model | status | units | params | space build ms | check ms | max abs equivalence "
        "error | analytic = measured | task build s | evaluator ms / policy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = _engine_row(name, args.policies)
            if row["status"] == "refused":
                print(f"| {name} | refused: {row['why']} | | | | | | | | |")
                continue
            built, ms = _evaluator_ms(name, args.evaluations, Path(tmp))
            print(
                f"| {name} | supported | {row['units']} | {row['params']:,} | "
                f"{row['build_ms']:.0f} | {row['verify_ms']:.0f} | {row['max_err']:.1e} | "
                f"{'yes' if row['costs_exact'] else 'NO'} | {built:.2f} | {ms:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
