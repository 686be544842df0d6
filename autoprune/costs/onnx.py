"""A model as an ONNX file and an ONNX Runtime session: what export and runtime latency share.

The file is written by PyTorch's ``torch.export``-based exporter (opset :data:`DEFAULT_OPSET`,
weights inside the file, input ``input``, output ``logits`` or ``output_<i>``, dynamic batch
axis); the session runs on ONNX Runtime's CPU provider with every graph optimisation.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OPSET = 18


# The ONNX exporter warns, on every first use, that torchvision's operators are not registered
# (autoprune has no torchvision); that says nothing about the model being exported.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters print progress lines; the caller reports the result."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=2**16)


def output_count(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, list | tuple):
        return sum(output_count(v) for v in value)
    return 0


def write_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` (traced on the batch ``x``, batch >= 2 so the axis stays dynamic)."""
    with torch.no_grad():
        count = output_count(model(x))
    names = ["logits"] if count == 1 else [f"output_{i}" for i in range(count)]
    with quiet():
        torch.onnx.export(
            model, (x,), str(path), dynamo=True, opset_version=opset, input_names=["input"],
            output_names=names, dynamic_shapes=({0: batch_dim()},), verbose=False,
            optimize=True, external_data=False,
        )  # fmt: skip


def ort_session(path: Path | bytes, threads: int | None = 1) -> Any:
    """An ONNX Runtime session on the CPU provider with ``threads`` intra-op threads (``None``:
    ONNX Runtime's default), every graph optimisation on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
