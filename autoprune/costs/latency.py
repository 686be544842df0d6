"""Measured latency of models on CPU: the median wall time of a forward pass.

* :func:`measure_latency` is the median wall time of a forward pass on CPU;
  :func:`measure_latencies` times several models in the same interleaved rounds (for ratios).
* :func:`round_robin` is the interleaved timing both use, and the latency table
  (:mod:`autoprune.costs.table`) too; :func:`num_threads` and :func:`cpu_forward` set up the
  conditions of a measurement (torch threads, eval mode, inference mode, a CPU copy).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from autoprune.costs.forward import (
    check_positive,
    check_shape,
    checked_forward,
    eval_mode,
    model_device,
)


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored after
    (also on error). ``None`` leaves the thread count alone."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def round_robin(
    calls: Sequence[Callable[[], Any]], warmup: int, repeats: int, rerun: bool = False
) -> list[float]:
    """Median wall seconds of each call, timed in ``repeats`` interleaved rounds (each call once
    per round) after ``warmup`` untimed rounds.

    Interleaving spreads a busy spell of a shared machine over all calls alike, so their ratios
    stay right even when the absolute speed drifts during the measurement; the median, not the
    mean, so that a run preempted by another process does not count.

    ``rerun``: each call runs once untimed right before its timed run, so that it is timed warm.
    Whole models need it: a round of many models evicts each other's kernels from oneDNN's
    primitive cache (1,024 entries by default), and a model's first pass after the others then
    pays for re-creating them. Timed one pass each in rounds of 14 models, MobileNetV2's pruned
    models measured 0.58-0.80 of the dense latency; timed warm, alone or with the dense model
    only, 0.33-0.43.
    """
    for _ in range(warmup):
        for fn in calls:
            fn()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for fn, bucket in zip(calls, times, strict=True):
            if rerun:
                fn()
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


@contextmanager
def cpu_forward(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int
) -> Iterator[Callable[[], Any]]:
    """A no-argument call running one forward pass of a random batch on CPU, valid inside the
    block (eval mode, ``torch.inference_mode``). A model on another device is copied to CPU;
    a shape that does not fit fails here, before any timing."""
    if model_device(model).type != "cpu":
        model = copy.deepcopy(model).cpu()
    x = torch.randn(batch_size, *input_shape)
    with eval_mode(model), torch.inference_mode():
        checked_forward(model, x, input_shape)
        yield lambda: model(x)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> float:
    """Median wall seconds of one forward pass of ``batch_size`` samples on CPU.

    Runs in eval mode under ``torch.inference_mode`` with ``threads`` torch threads (``None``:
    leave torch's setting), restoring the previous thread count and the model's train/eval
    flags afterwards, also on error. A model on another device is measured on a CPU copy.
    The median, not the mean, because one preempted run on a shared machine must not count.
    """
    return measure_latencies([model], input_shape, batch_size, threads, warmup, repeats)[0]


def measure_latencies(
    models: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> list[float]:
    """Median wall seconds of one forward pass of each model, all timed in the same interleaved
    rounds (each model once per round, timed warm: right after an untimed pass of its own, see
    :func:`round_robin`).

    The way to compare models, e.g. a pruned model against its dense one: measured one after
    the other, a machine whose speed changes in between (another process starts, a frequency
    drop) puts the change into their ratio; interleaved, both see it alike. Same conditions as
    :func:`measure_latency`; every model's shape is checked by one forward pass before any
    timing.
    """
    shape = check_shape(input_shape)
    check_positive(batch_size=batch_size, threads=threads, repeats=repeats)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    models = list(models)
    if not models:
        raise ValueError("measure_latencies needs at least one model")
    with num_threads(threads), ExitStack() as stack:
        runs = [stack.enter_context(cpu_forward(m, shape, batch_size)) for m in models]
        return round_robin(runs, warmup, repeats, rerun=len(runs) > 1)
