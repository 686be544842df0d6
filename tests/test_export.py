"""Export of pruned models (ONNX, TorchScript, ExportedProgram): each file, loaded in its own
runtime by this test, computes what the pruned PyTorch model computes; what cannot be exported
is refused by name, and a refused export leaves no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from structures import SHAPE, STRUCTURES, randomize_norms
from torch import nn
from typer.testing import CliRunner

from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.export import ExportError, export
from autoprune.models import MODELS, build_model

torch.set_num_threads(1)
# concatenation, grouped convs, depthwise + squeeze-excite, squeeze-excite, layer scale,
# transposed convs: the structures users' models are made of.
ZOO = ["densenet", "resnext", "mobilenetv3", "regnet", "convnext", "unet"]


def _pruned(name: str, level: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    model = STRUCTURES[name]() if name in STRUCTURES else build_model(name, 1, 10)
    model = randomize_norms(model).eval()
    space = PruningSpace(model, SHAPE, "channel")
    rng = np.random.default_rng(0)
    ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
    ratios = rng.uniform(0, level * space.max_ratio, len(space))
    return prune_model(model, space, ranking, ratios).eval()


def _onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(MODELS) + ZOO)
def test_pruned_model_round_trips_through_onnx_runtime(name: str, tmp_path: Path) -> None:
    model = _pruned(name)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    result = export(model, tmp_path / "m.onnx", "onnx", example_input=x[:1])
    assert result.path.is_file() and result.opset == 18 and result.batch_sizes == (1, 8)
    with torch.no_grad():
        want = model(x).numpy()
    got = _onnx_outputs(result.path, x)  # batch 5: the batch axis is dynamic
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert result.max_rel_error <= 1e-4  # of the largest output (randomised norms: large)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # weights inside, no temp


@pytest.mark.parametrize("fmt", ["torchscript", "exported_program"])
@pytest.mark.parametrize("name", ["resnet20", "unet"])
def test_pruned_model_round_trips_through_torch_formats(name: str, fmt: str, tmp_path: Path):
    model = _pruned(name)
    x = torch.randn(3, *SHAPE)
    result = export(model, tmp_path / f"m.{fmt}", fmt, example_input=x[:1], inputs=x)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(result.path))
    else:
        loaded = torch.export.load(str(result.path)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert result.inputs == "3 given" and result.batch_sizes == (1, 3)


class _Gate(nn.Module):
    """Control flow that depends on the data: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = _Gate()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("fmt", ["onnx", "exported_program"])
def test_an_unexportable_layer_is_named_and_no_file_is_written(fmt: str, tmp_path: Path):
    with pytest.raises(ExportError) as err:
        export(_Unexportable(), tmp_path / "m.out", fmt, example_input=torch.randn(1, 1, 8, 8))
    message = str(err.value)
    assert "layer 'gate' (_Gate)" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


class _Noisy(nn.Module):
    """Different outputs on every call: no exported file can match it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand(x.shape[0], 3)


def test_outputs_beyond_the_tolerance_fail_the_export(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"computes other outputs .* max abs error"):
        export(_Noisy(), tmp_path / "m.ts", "torchscript", example_input=torch.randn(1, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "tflite"}, "unknown export format 'tflite'"),
        ({"atol": -1.0}, "atol and rtol must be >= 0"),
        ({"inputs": torch.randn(2, 1, 5, 5)}, "per-sample shape"),
    ],
)
def test_bad_arguments_are_refused_before_exporting(kwargs, message, tmp_path: Path) -> None:
    model = build_model("resnet20", 1, 10)
    with pytest.raises(ExportError, match=message):
        export(model, tmp_path / "m.onnx", example_input=torch.randn(1, *SHAPE), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_apply_export_and_the_export_command_write_checked_files(default_task, tmp_path: Path):
    """``autoprune apply --export onnx`` beside the pruned model, then ``autoprune export`` of
    that model file (its input shape read from the file) to TorchScript."""
    from autoprune.cli import app
    from autoprune.policy import Policy

    vec = np.full(len(default_task.space), 0.5)
    policy_file = Policy.from_task(default_task, vec).save(tmp_path / "policy.json")
    runner = CliRunner()
    pruned = tmp_path / "pruned.pt"
    done = runner.invoke(
        app, ["apply", "--policy", str(policy_file), "--out", str(pruned), "--export", "onnx"]
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "pruned.onnx").is_file()
    from autoprune.apply import load_pruned

    model, _ = load_pruned(pruned)
    x = next(iter(default_task.data.batches("test", 16)))[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(
        _onnx_outputs(tmp_path / "pruned.onnx", x), want, rtol=1e-3, atol=1e-4
    )

    done = runner.invoke(app, ["export", str(pruned), "--format", "torchscript"])
    assert done.exit_code == 0, done.output
    loaded = torch.jit.load(str(tmp_path / "pruned.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), want, rtol=1e-5, atol=1e-6)
    done = runner.invoke(app, ["export", str(pruned), "--format", "tflite"])
    assert done.exit_code != 0
