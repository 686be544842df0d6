"""Training, fine-tuning, adaptive BN, accuracy and the default checkpoint cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoprune.config import DataConfig, TrainConfig
from autoprune.data import DataSplits, load_data
from autoprune.models import ModelError, build_model, load_checkpoint
from autoprune.training import (
    checkpoint_key,
    default_checkpoint,
    evaluate_accuracy,
    fine_tune,
    random_shift,
    recalibrate_bn,
    resolve_device,
    train,
    train_checkpoint,
)


def tiny_net(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data(DataConfig())


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_recalibrate_bn_changes_stats_and_is_deterministic(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    before = _bn_stats(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    recalibrate_bn(model, digits.x_train, num_batches=4, batch_size=64, seed=1)
    after = _bn_stats(model)
    assert not model.training
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert momenta == [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Same seed, same statistics, whatever they were before.
    recalibrate_bn(model, digits.x_train, num_batches=4, batch_size=64, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(after, _bn_stats(model), strict=True))
    recalibrate_bn(model, digits.x_train, num_batches=4, batch_size=64, seed=2)
    assert not torch.equal(after[0], _bn_stats(model)[0])


def test_recalibrate_bn_is_cumulative_average(digits: DataSplits) -> None:
    """With momentum None the first BN's running mean is the exact mean of its inputs."""
    model = tiny_net()
    x = digits.x_train[:100]
    recalibrate_bn(model, x, num_batches=2, batch_size=50, seed=0)
    with torch.no_grad():
        conv_out = model[0](x)
    expected = conv_out.mean(dim=(0, 2, 3))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    torch.testing.assert_close(bn.running_mean, expected, atol=1e-5, rtol=1e-4)


def test_recalibrate_bn_is_fast(digits: DataSplits) -> None:
    model = build_model("resnet20", 1, 10)
    recalibrate_bn(model, digits.x_train, 4, 64)  # warm-up
    start = time.perf_counter()
    recalibrate_bn(model, digits.x_train, 4, 64)
    assert time.perf_counter() - start < 2.0  # ~0.05 s on an idle laptop core


def test_evaluate_accuracy_bounds_and_mode(digits: DataSplits) -> None:
    model = tiny_net().train()
    acc, loss = evaluate_accuracy(model, digits.x_test, digits.y_test, batch_size=100)
    assert 0.0 <= acc <= 1.0 and loss > 0
    assert model.training  # mode is restored
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(model, digits.x_test[:0], digits.y_test[:0])


def test_tiny_model_trains_above_chance(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = tiny_net(width=32)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.1)
    history = train(model, digits, cfg)
    assert len(history["train_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["test_acc"] > 0.5  # chance is 0.1


def test_train_checkpoint_saves_weights_that_score_as_reported(tmp_path) -> None:
    from autoprune.config import task_config
    from autoprune.models import build_model

    cfg = task_config(None, ["model.name=plain20", "train.epochs=1", "data.name=digits"])
    torch.manual_seed(0)
    history = train_checkpoint(cfg, tmp_path / "sub" / "plain20.pt")
    data = load_data(cfg.data)
    model = build_model("plain20", data.in_channels, data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "sub" / "plain20.pt", weights_only=True))
    acc, _ = evaluate_accuracy(model, data.x_test, data.y_test, batch_size=100)
    assert acc == pytest.approx(history["test_acc"], abs=1e-6)


def test_train_is_deterministic(digits: DataSplits) -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny_net()
        train(model, digits, TrainConfig(epochs=1, seed=3))
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_bn_l1_shrinks_gammas(digits: DataSplits) -> None:
    def gamma_l1(bn_l1: float) -> float:
        torch.manual_seed(0)
        model = tiny_net(width=16)
        train(model, digits, TrainConfig(epochs=2, bn_l1=bn_l1, augment=False))
        gammas = [m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        return float(sum(g.abs().sum() for g in gammas))

    assert gamma_l1(0.1) < 0.7 * gamma_l1(0.0)


def test_random_shift_moves_content() -> None:
    x = torch.zeros(64, 2, 8, 8)
    x[:, :, 3, 4] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], out[:, 1])  # channels move together
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in out if img.sum() > 0}
    assert len(positions) > 3
    assert all(abs(r - 3) <= 1 and abs(c - 4) <= 1 for r, c in positions)


def test_fine_tune_respects_prune_masks(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = tiny_net(width=16)
    conv = model[3]
    assert isinstance(conv, nn.Conv2d)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    before = conv.weight.detach().clone()
    history = fine_tune(model, digits, epochs=1, lr=0.05, max_batches=5)
    assert history["batches"] == 5
    assert len(history["train_loss"]) == 1
    mask: torch.Tensor = getattr(conv, "weight_mask").bool()  # noqa: B009 (typed access)
    model(digits.x_train[:2])  # the forward pre-hook recomputes weight from weight_orig
    weight = conv.weight.detach()
    assert torch.count_nonzero(weight[~mask]) == 0
    assert torch.count_nonzero(weight[mask]) == int(mask.sum())
    assert not torch.equal(weight[mask], before[mask])  # the kept weights did train


def test_fine_tune_epochs_without_cap(digits: DataSplits) -> None:
    model = tiny_net()
    history = fine_tune(model, digits, epochs=2, batch_size=256)
    assert history["batches"] == 2 * -(-len(digits.y_train) // 256)
    assert not model.training


def test_default_checkpoint_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    data_cfg = DataConfig(search_size=100)
    train_cfg = TrainConfig(epochs=1, batch_size=128)
    path = default_checkpoint("plain20", data_cfg, train_cfg)
    assert path.parent == tmp_path / "cache" and path.is_file()
    assert checkpoint_key("plain20", data_cfg, train_cfg) in path.name
    mtime = path.stat().st_mtime_ns
    assert default_checkpoint("plain20", data_cfg, train_cfg) == path  # cached, not retrained
    assert path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob("*.tmp"))
    load_checkpoint(build_model("plain20", 1, 10), path)
    meta = json.loads(torch.load(path, weights_only=True)["meta"])
    assert meta["model"] == "plain20" and 0 <= meta["test_acc"] <= 1
    other = checkpoint_key("plain20", data_cfg, TrainConfig(epochs=2, batch_size=128))
    assert other != checkpoint_key("plain20", data_cfg, train_cfg)


def test_default_checkpoint_needs_zoo_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="zoo models"):
        default_checkpoint("pkg.mod:factory", DataConfig(), cache_dir=tmp_path)


@pytest.mark.slow
def test_default_resnet20_digits_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default task's checkpoint: ResNet-20 on digits, >= 98% test accuracy."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    path = default_checkpoint("resnet20", DataConfig())
    data = load_data(DataConfig())
    model = load_checkpoint(build_model("resnet20", 1, 10), path)
    acc, _ = evaluate_accuracy(model, data.x_test, data.y_test)
    assert acc >= 0.98
    meta = json.loads(torch.load(path, weights_only=True)["meta"])
    assert meta["test_acc"] == pytest.approx(acc)
