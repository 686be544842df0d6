"""Latency on the deployment runtime: PyTorch eager and ONNX Runtime, dense against pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.costs.runtimes import RUNTIMES, runtime_latencies, runtime_rows

torch.set_num_threads(1)


def _net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_times_every_model(runtime: str) -> None:
    models = [_net(32), _net(4)]
    seconds = runtime_latencies(models, (1, 16, 16), runtime, batch_size=4, repeats=5)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all(not m.training for m in models)  # modes left as they were


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # data-dependent: the ONNX exporter refuses it


def test_a_model_onnx_cannot_hold_gets_an_error_row_not_a_failure() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _Gate(), nn.Flatten()).eval()
    rows = runtime_rows(model, model, (1, 8, 8), [1, 2], repeats=3)
    by = {(r["runtime"], r["batch"]): r for r in rows}
    assert set(by) == {("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    assert by[("torch", 2)]["speedup"] > 0 and "error" not in by[("torch", 2)]
    assert "error" in by[("onnxruntime", 1)] and "dense_ms" not in by[("onnxruntime", 1)]


def test_bad_runtimes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown latency runtime 'tvm'; choose from"):
        runtime_latencies([_net(4)], (1, 8, 8), "tvm")
    with pytest.raises(ValueError, match="unknown latency runtime"):
        runtime_rows(_net(4), _net(4), (1, 8, 8), [1], runtimes=("torch", "tvm"))


def test_apply_times_dense_and_pruned_on_both_runtimes(default_task) -> None:
    import autoprune as ap

    with pytest.raises(ValueError, match="unknown latency runtime"):
        ap.apply_policy(default_task, np.full(len(default_task.space), 0.5), runtimes=["tvm"])
    vec = np.full(len(default_task.space), 0.5)
    result = ap.apply_policy(default_task, vec, latency=False, runtimes=RUNTIMES)
    batches = sorted({1, default_task.config.eval.latency_batch_size})
    assert [(r["runtime"], r["batch"]) for r in result.runtimes] == [
        (rt, b) for rt in RUNTIMES for b in batches
    ]
    for row in result.runtimes:
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["pruned_ms"])
    timed = ap.apply_policy(default_task, vec, latency=True, runtimes=["torch"])
    batch = default_task.config.eval.latency_batch_size
    row = next(r for r in timed.runtimes if r["batch"] == batch)  # one timing, shown in both
    assert row["dense_ms"] == timed.before["latency_ms"]
    assert row["pruned_ms"] == timed.after["latency_ms"]
