"""Latency on the runtime a model is deployed with: PyTorch eager or ONNX Runtime.

The MACs ratio of a pruned model is not its speedup, and two runtimes give it different
speedups (measured in docs/results/latency.md: a ResNet-20 at a quarter of the MACs runs 1.88x
faster in PyTorch at batch 1 and 2.28x in ONNX Runtime, 3.32x and 1.66x at batch 64). Both are
timed like :func:`autoprune.costs.latency.measure_latencies`: models interleaved in the same
rounds, each warm, the median.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from autoprune.costs.forward import check_positive, check_shape, model_device
from autoprune.costs.latency import measure_latencies, round_robin
from autoprune.costs.onnx import ort_session, write_onnx

RUNTIMES = ("torch", "onnxruntime")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown latency runtime {runtime!r}; choose from {list(RUNTIMES)}")
    return runtime


def runtime_latencies(
    models: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    runtime: str = "torch",
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> list[float]:
    """Median wall seconds of one forward pass of each model on ``runtime``, interleaved.

    ``onnxruntime``: each model is exported to ONNX (a temporary file) and run in an ONNX
    Runtime session with ``threads`` intra-op threads on the CPU provider.
    """
    check_runtime(runtime)
    if runtime == "torch":
        return measure_latencies(models, input_shape, batch_size, threads, warmup, repeats)
    shape = check_shape(input_shape)
    check_positive(batch_size=batch_size, repeats=repeats)
    return _time_sessions(_sessions(models, shape, threads), shape, batch_size, warmup, repeats)


def _sessions(models: Sequence[nn.Module], shape: tuple[int, ...], threads: int | None) -> list:
    """An ONNX Runtime session of each model (exported through a temporary file)."""
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for i, model in enumerate(models):
            path = Path(folder) / f"m{i}.onnx"
            cpu = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
            was_training = cpu.training
            try:
                write_onnx(cpu.eval(), torch.randn(2, *shape), path)
            finally:
                cpu.train(was_training)
            out.append(ort_session(path, threads))
    return out


def _time_sessions(
    sessions: list, shape: tuple[int, ...], batch: int, warmup: int, repeats: int
) -> list[float]:
    feed = {"input": torch.randn(batch, *shape).numpy()}
    calls = [lambda s=s: s.run(None, feed) for s in sessions]
    return round_robin(calls, warmup, repeats, rerun=True)


def runtime_rows(
    dense: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    batches: Sequence[int],
    runtimes: Sequence[str] = RUNTIMES,
    repeats: int = 30,
    timed: Mapping[tuple[str, int], tuple[float, float]] | None = None,
) -> list[dict[str, object]]:
    """Dense against pruned on each runtime and batch size: ``runtime``, ``batch``,
    ``dense_ms``, ``pruned_ms``, ``speedup`` (dense / pruned), one thread. A runtime that
    cannot run the model (a layer the ONNX exporter refuses) gets a row with ``error``
    instead of timings: the PyTorch model is still the product. ``timed``: (runtime, batch)
    -> (dense, pruned) seconds already measured the same way, used instead of timing again."""
    for runtime in runtimes:
        check_runtime(runtime)
    rows: list[dict[str, object]] = []
    shape = check_shape(input_shape)
    known = dict(timed or {})
    for runtime in runtimes:
        todo = [b for b in batches if (runtime, b) not in known]
        try:
            sessions = (
                _sessions([dense, pruned], shape, 1) if runtime == "onnxruntime" and todo else None
            )
        except Exception as exc:  # the exporter raises many types
            rows += [{"runtime": runtime, "batch": b, "error": _first_line(exc)} for b in batches]
            continue
        for batch in batches:
            if (runtime, batch) in known:
                d, p = known[(runtime, batch)]
            elif sessions is None:
                d, p = measure_latencies([dense, pruned], shape, batch, 1, 5, repeats)
            else:
                d, p = _time_sessions(sessions, shape, batch, 5, repeats)
            rows.append({"runtime": runtime, "batch": batch, "dense_ms": 1e3 * d,
                         "pruned_ms": 1e3 * p, "speedup": d / p})  # fmt: skip
    return rows


def _first_line(exc: BaseException) -> str:
    line = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
    return f"{type(exc).__name__}: {line[:200]}"
