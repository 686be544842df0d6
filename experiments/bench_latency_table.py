"""How well does NetAdapt's latency lookup table predict the latency of channel-pruned models?

Builds the table of the zoo's ResNet-20 on (1, 8, 8) and (3, 32, 32) inputs, then compares the
predicted and the measured CPU latency (one thread, batch 1) of the dense model and of random
channel configurations (every dependency group keeps a random fraction in [0.2, 1] of its
channels, removed with torch-pruning). Run: ``python experiments/bench_latency_table.py``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from autoprune.costs.measure import LatencyTable, measure_latency, measure_macs
from autoprune.models import build_model


def random_channels(
    model: nn.Module, input_shape: tuple[int, ...], rng: np.random.Generator
) -> nn.Module:
    """A copy of ``model`` whose every channel group keeps a random fraction in [0.2, 1]."""
    pruned = copy.deepcopy(model).eval()
    example = torch.zeros(1, *input_shape)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    classifier = pruned.get_submodule("fc")
    roots = [g[0].dep.target.module for g in graph.get_all_groups(ignored_layers=[classifier])]
    for root in roots:
        if not isinstance(root, nn.Conv2d):
            continue
        n = root.out_channels
        keep = max(1, round(n * rng.uniform(0.2, 1.0)))
        idxs = rng.choice(n, size=n - keep, replace=False).tolist()
        if idxs:
            graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs).prune()
    return pruned


def bench_shape(input_shape: tuple[int, ...], configs: int, seed: int, repeats: int) -> list[float]:
    """Print the table's build time and its errors for one input shape; return the errors."""
    model = build_model("resnet20", in_channels=input_shape[0], num_classes=10).eval()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        table = LatencyTable.build(model, input_shape, cache_dir=Path(folder))
        built = time.perf_counter() - start
        start = time.perf_counter()
        LatencyTable.build(model, input_shape, cache_dir=Path(folder))
        cached = time.perf_counter() - start
    print(f"\n== resnet20, input {input_shape}, batch 1, 1 thread ==")
    print(f"table: {len(table.layers)} layers, built in {built:.2f} s, cached load {cached:.3f} s")
    print(f"overhead {1e3 * table.overhead:+.3f} ms (dense measured during build: "
          f"{1e3 * table.dense_measured:.3f} ms)")  # fmt: skip
    print(f"{'model':<10} {'MACs':>7} {'predicted ms':>13} {'measured ms':>12} {'rel. error':>11}")
    rng = np.random.default_rng(seed)
    dense_macs = measure_macs(model, input_shape)
    models = [("dense", model)]
    models += [
        (f"random {i + 1}", random_channels(model, input_shape, rng)) for i in range(configs)
    ]
    errors = []
    for label, candidate in models:
        predicted = table.predict_model(candidate)
        measured = measure_latency(candidate, input_shape, threads=1, repeats=repeats)
        errors.append((predicted - measured) / measured)
        macs = measure_macs(candidate, input_shape) / dense_macs
        print(f"{label:<10} {macs:>7.2f} {1e3 * predicted:>13.3f} {1e3 * measured:>12.3f} "
              f"{errors[-1]:>+11.1%}")  # fmt: skip
    print(f"mean absolute relative error: {np.mean(np.abs(errors)):.1%}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=5, help="random channel configurations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per measurement")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    errors = []
    for shape in [(1, 8, 8), (3, 32, 32)]:
        errors += bench_shape(shape, args.configs, args.seed, args.repeats)
    print(f"\noverall mean absolute relative error: {np.mean(np.abs(errors)):.1%}")


if __name__ == "__main__":
    main()
