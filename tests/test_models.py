"""Model zoo, registry, factory strings and checkpoint loading."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from autoprune.models import (
    MODELS,
    ModelError,
    build_model,
    checkpoint_hash,
    classifier_name,
    load_checkpoint,
)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_model_forwards_at_every_size(name: str, in_channels: int) -> None:
    model = build_model(name, in_channels, 7).eval()
    with torch.no_grad():
        for size in (8, 16, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, 7)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_classifier_is_last_linear_named_fc(name: str) -> None:
    model = build_model(name, 3, 10)
    assert classifier_name(model) == "fc"
    fc = model.get_submodule("fc")
    assert isinstance(fc, nn.Linear) and fc.out_features == 10


@pytest.mark.parametrize("name", sorted(MODELS))
def test_activations_are_modules(name: str) -> None:
    """Hooks and tracers must see every nonlinearity, so none may be a functional call."""
    model = build_model(name, 3, 10)
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(acts) >= len(convs) // 2


def test_resnet_depths_and_shortcuts() -> None:
    def convs(name: str) -> int:
        model = build_model(name, 3, 10)
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())

    assert [convs(n) for n in ("resnet20", "resnet32", "resnet56")] == [19, 31, 55]
    projections = [
        n for n, _ in build_model("resnet20", 3, 10).named_modules() if n.endswith("shortcut.0")
    ]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    plain = build_model("plain20", 3, 10)
    assert not any(n.endswith("shortcut.0") for n, _ in plain.named_modules())


def test_mobilenetv2_width_mult_and_depthwise() -> None:
    small = build_model("mobilenetv2", 3, 10, width_mult=0.5)
    full = build_model("mobilenetv2", 3, 10)
    count = sum(p.numel() for p in small.parameters())
    assert count < sum(p.numel() for p in full.parameters())
    depthwise = [m for m in full.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_unknown_zoo_name_lists_known_models() -> None:
    with pytest.raises(ModelError, match="resnet20") as info:
        build_model("resnet21", 3, 10)
    assert "resnet21" in str(info.value)


def test_bad_kwargs_are_a_model_error() -> None:
    with pytest.raises(ModelError, match="rejected its arguments"):
        build_model("resnet20", 3, 10, width_mult=0.5)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throw-away importable module with good and bad factories."""
    source = textwrap.dedent(
        """
        from torch import nn

        def tiny(in_channels=3, num_classes=10, hidden=4):
            return nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes),
            )

        def not_a_module(in_channels=3, num_classes=10):
            return "oops"

        NOT_CALLABLE = 3
        """
    )
    (tmp_path / "ap_test_factories.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ap_test_factories"
    sys.modules.pop("ap_test_factories", None)


def test_factory_string_builds_model(factory_module: str) -> None:
    model = build_model(f"{factory_module}:tiny", 1, 5, hidden=6)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert classifier_name(model) == "4"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("{mod}:missing", "has no attribute"),
        ("{mod}:NOT_CALLABLE", "not callable"),
        ("{mod}:not_a_module", "not an nn.Module"),
        ("{mod}:", "expected 'package.module:factory'"),
    ],
)
def test_factory_string_errors(factory_module: str, spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec.format(mod=factory_module), 3, 10)


def test_classifier_name_without_linear() -> None:
    with pytest.raises(ModelError, match=r"no nn\.Linear"):
        classifier_name(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    source = build_model("resnet20", 1, 10)
    path = tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), path)
    target = load_checkpoint(build_model("resnet20", 1, 10), path)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # The same weights under a "state_dict" key (with metadata beside it) load too.
    torch.save({"state_dict": source.state_dict(), "meta": "{}"}, tmp_path / "wrapped.pt")
    load_checkpoint(build_model("resnet20", 1, 10), tmp_path / "wrapped.pt")


def test_checkpoint_uses_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(build_model("plain20", 1, 10).state_dict(), path)
    with mock.patch("torch.load", wraps=torch.load) as spy:
        load_checkpoint(build_model("plain20", 1, 10), path)
    assert spy.call_args.kwargs["weights_only"] is True
    assert spy.call_args.kwargs["map_location"] == "cpu"


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": build_model("plain20", 1, 10).state_dict(), "x": Path("a")}, path)
    with pytest.raises(ModelError, match="cannot load"):
        load_checkpoint(build_model("plain20", 1, 10), path)


def test_mismatched_checkpoint_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(build_model("resnet20", 1, 10).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(build_model("resnet32", 1, 10), path)
    assert "missing keys" in str(info.value) and "layer1.3.conv1.weight" in str(info.value)
    torch.save(build_model("resnet20", 3, 10).state_dict(), path)
    with pytest.raises(ModelError, match=r"shape mismatches \(1\): conv1.weight"):
        load_checkpoint(build_model("resnet20", 1, 10), path)
    state = build_model("resnet20", 1, 10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"unexpected keys \(1\): extra.weight"):
        load_checkpoint(build_model("resnet20", 1, 10), path)


def test_missing_or_malformed_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(build_model("plain20", 1, 10), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load"):
        load_checkpoint(build_model("plain20", 1, 10), tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        load_checkpoint(build_model("plain20", 1, 10), tmp_path / "list.pt")


def test_checkpoint_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"abc")
    b.write_bytes(b"abd")
    assert checkpoint_hash(a) == "ba7816bf8f01cfea"  # sha256("abc")
    assert len(checkpoint_hash(b)) == 16 and checkpoint_hash(a) != checkpoint_hash(b)
