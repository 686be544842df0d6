"""Export a (pruned) model the way users ship it, checked before the file is kept.

Three formats: ``onnx`` (for ONNX Runtime, and OpenVINO / TensorRT, which read ONNX; written by
PyTorch's ``torch.export``-based ONNX exporter at opset :data:`DEFAULT_OPSET`), ``torchscript``
(``torch.jit.trace``) and ``exported_program`` (``torch.export``'s ``.pt2``). Every file has a
dynamic batch axis; an ONNX file names its input ``input`` and its output ``logits`` (``output_0``,
``output_1``, ... for several outputs).

After writing, the file is loaded in the runtime it is for (ONNX Runtime's CPU provider,
``torch.jit.load``, ``torch.export.load``) and run at batch 1 and at the batch of the check
inputs; its outputs are compared with the PyTorch model's. The export fails, and leaves no file,
when any output differs by more than ``atol + rtol * |reference|`` (default 1e-4 + 1e-3 x; float32
kernels of two runtimes differ by about 1e-6 on the zoo's models). A layer the exporter cannot
handle is named in a one-line error: the deepest module that fails to export on its own.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.costs.onnx import DEFAULT_OPSET, batch_dim, ort_session, quiet, write_onnx

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported_program": ".pt2"}
CHECKED_WITH = {
    "onnx": "onnxruntime (CPUExecutionProvider)",
    "torchscript": "torch.jit.load",
    "exported_program": "torch.export.load",
}
ATOL = 1e-4
RTOL = 1e-3
CHECK_BATCH = 8  # random check inputs when no real ones are given


class ExportError(ValueError):
    """An export that cannot be made or that does not compute what the PyTorch model does."""


@dataclass
class ExportResult:
    """What was written and how well it agrees with the PyTorch model."""

    path: Path
    format: str
    seconds: float  # export, without the check
    check_seconds: float
    max_abs_error: float
    max_rel_error: float  # max |ours - torch| / max |torch|
    atol: float
    rtol: float
    checked_with: str
    batch_sizes: tuple[int, ...]
    inputs: str  # where the check inputs came from
    opset: int | None
    size_bytes: int

    def row(self) -> dict[str, Any]:
        return {
            "format": self.format, "file": str(self.path), "size_mb": self.size_bytes / 2**20,
            "opset": self.opset, "export_seconds": self.seconds,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "checked_with": self.checked_with, "batch_sizes": list(self.batch_sizes),
            "inputs": self.inputs,
        }  # fmt: skip


def default_path(source: str | Path, fmt: str) -> Path:
    """``pruned.pt`` -> ``pruned.onnx`` (``.ts``, ``.pt2``)."""
    return Path(source).with_suffix(check_format(fmt))


def check_format(fmt: str) -> str:
    """The file suffix of a format; a clear error for an unknown one."""
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ExportError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}") from None


def export(
    model: nn.Module | str | Path,
    path: str | Path,
    format: str = "onnx",
    *,
    example_input: torch.Tensor | None = None,
    inputs: torch.Tensor | None = None,
    instance: nn.Module | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> ExportResult:
    """Export ``model`` (a module, or a file written by :func:`autoprune.apply.save_pruned`) to
    ``path`` and check the file in its runtime against the model on ``inputs``.

    ``example_input`` gives the input shape of a module (a pruned file records its own);
    ``inputs`` are the check inputs (default: :data:`CHECK_BATCH` random normal samples, seed 0;
    pass real ones, e.g. a test batch, to check on the data the model will see). ``instance``:
    a dense instance of the architecture, for a file pruned from your own module.
    """
    check_format(format)
    if atol < 0 or rtol < 0:
        raise ExportError(f"atol and rtol must be >= 0, got {atol} and {rtol}")
    module, shape = _source(model, example_input, instance)
    checks, origin = _check_inputs(inputs, shape)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        start = time.perf_counter()
        _WRITERS[format](module, _trace_input(shape), tmp, opset)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        abs_err, rel_err, sizes = _compare(
            module, _RUNNERS[format](tmp), checks, atol, rtol, format
        )
        check_seconds = time.perf_counter() - start
        os.replace(tmp, out)
    finally:
        for leftover in tmp.parent.glob(tmp.name + "*"):
            leftover.unlink()
    return ExportResult(
        path=out, format=format, seconds=seconds, check_seconds=check_seconds,
        max_abs_error=abs_err, max_rel_error=rel_err, atol=atol, rtol=rtol,
        checked_with=CHECKED_WITH[format], batch_sizes=sizes, inputs=origin,
        opset=opset if format == "onnx" else None, size_bytes=out.stat().st_size,
    )  # fmt: skip


# ------------------------------------------------------------------ inputs


def _source(
    model: nn.Module | str | Path, example: torch.Tensor | None, instance: nn.Module | None
) -> tuple[nn.Module, tuple[int, ...]]:
    """The module to export (in eval mode, on the CPU) and its per-sample input shape."""
    if isinstance(model, str | Path):
        from autoprune.apply import load_pruned

        loaded, policy = load_pruned(model, model=instance)
        shape = tuple(int(s) for s in policy.fingerprint.get("input_shape", ()))
        if example is not None:
            shape = tuple(example.shape[1:])
        if not shape:
            raise ExportError(f"{model} records no input shape: pass example_input")
        return loaded.eval().cpu(), shape
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be an nn.Module or a pruned model file, got {model!r}")
    if example is None:
        raise ExportError("example_input is needed to export a module (e.g. one input batch)")
    return model.eval().cpu(), tuple(example.shape[1:])


def _check_inputs(inputs: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(CHECK_BATCH, *shape, generator=gen), f"{CHECK_BATCH} random normal"
    if tuple(inputs.shape[1:]) != shape:
        raise ExportError(
            f"check inputs have per-sample shape {tuple(inputs.shape[1:])}, the model {shape}"
        )
    return inputs.float().cpu(), f"{len(inputs)} given"


def _trace_input(shape: tuple[int, ...]) -> torch.Tensor:
    """Batch 2: an example of batch 1 would make the exporters specialise the batch axis."""
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))


def _outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, list | tuple):
        return [o for v in value for o in _outputs(v)]
    if isinstance(value, np.ndarray):
        return [value]
    raise ExportError(f"the model returns {type(value).__name__}; export needs tensors")


# ------------------------------------------------------------------ writers


def _write_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with _exporting(model, x, "onnx"):
        write_onnx(model, x, path, opset)


def _write_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with _exporting(model, x, "torchscript"), quiet():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path))


def _write_exported_program(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with _exporting(model, x, "exported_program"), quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch_dim()},))
        torch.export.save(program, str(path))


_WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, int], None]] = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "exported_program": _write_exported_program,
}


@contextlib.contextmanager
def _exporting(model: nn.Module, x: torch.Tensor, fmt: str) -> Iterator[None]:
    """Turn an exporter's failure into one line naming the layer it cannot handle."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:  # the exporters raise many types; each becomes one line
        raise ExportError(_blame(model, x, fmt, exc)) from None


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text[:300]}"


def _blame(model: nn.Module, x: torch.Tensor, fmt: str, exc: BaseException) -> str:
    """The deepest module that fails to export on its own, with the exporter's first line."""
    args: dict[str, tuple[Any, ...]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, name=name: args.setdefault(name, a))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # the model itself fails: the exporter's message says why
        pass
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    for name in sorted(args, key=lambda n: -n.count(".")):
        try:
            with quiet():
                if fmt == "torchscript":
                    torch.jit.trace(modules[name], args[name], check_trace=False)
                else:
                    torch.export.export(modules[name], args[name])
        except Exception as inner:  # this layer is one the exporter cannot handle
            kind = type(modules[name]).__name__
            return f"cannot export to {fmt}: layer {name!r} ({kind}) fails: {_first_line(inner)}"
    return f"cannot export to {fmt}: {_first_line(exc)}"


# ------------------------------------------------------------------ runners and the check

Runner = Callable[[torch.Tensor], list[np.ndarray]]


def _run_onnx(path: Path) -> Runner:
    session = ort_session(path, threads=1)
    name = session.get_inputs()[0].name
    return lambda x: list(session.run(None, {name: x.numpy()}))


def _run_torchscript(path: Path) -> Runner:
    module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: _outputs(module(x))


def _run_exported_program(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()
    return lambda x: _outputs(module(x))


_RUNNERS: dict[str, Callable[[Path], Runner]] = {
    "onnx": _run_onnx,
    "torchscript": _run_torchscript,
    "exported_program": _run_exported_program,
}


def _compare(
    model: nn.Module, run: Runner, x: torch.Tensor, atol: float, rtol: float, fmt: str
) -> tuple[float, float, tuple[int, ...]]:
    """Max abs and relative error of the exported file against the model at batch 1 and at
    the full check batch; an :class:`ExportError` above the tolerance."""
    sizes = tuple(sorted({1, len(x)}))
    abs_err = rel_err = 0.0
    for size in sizes:
        batch = x[:size]
        with torch.no_grad():
            want = _outputs(model(batch))
        try:
            got = run(batch)
        except Exception as exc:  # the runtime refuses the file at this batch size
            raise ExportError(f"the {fmt} file fails at batch {size}: {_first_line(exc)}") from None
        if len(got) != len(want) or any(
            g.shape != w.shape for g, w in zip(got, want, strict=False)
        ):
            raise ExportError(f"the {fmt} file's outputs have other shapes at batch {size}")
        for g, w in zip(got, want, strict=True):
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            abs_err = max(abs_err, float(diff.max(initial=0.0)))
            rel_err = max(
                rel_err, float(diff.max(initial=0.0)) / max(float(np.abs(w).max()), 1e-12)
            )
            if bool((diff > atol + rtol * np.abs(w)).any()):
                raise ExportError(
                    f"the {fmt} file computes other outputs than the model: max abs error "
                    f"{abs_err:.3g}, max relative error {rel_err:.3g} at batch {size} (tolerance "
                    f"{atol:g} + {rtol:g} x |output|)"
                )
    return abs_err, rel_err, sizes
