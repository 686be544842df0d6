"""Data loading and splitting: digits, cifar10 (fake pickles), npz; errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.config import DataConfig
from autoprune.data import DataError, DataSplits, iterate_batches, load_data


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_digits_split_sizes_and_types() -> None:
    data = load_data(DataConfig(search_size=300, test_fraction=0.25))
    assert data.sizes() == {"train": 1797 - 450 - 300, "search": 300, "test": 450}
    assert (data.num_classes, data.input_shape, data.name) == (10, (1, 8, 8), "digits")
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.shape[1:] == (1, 8, 8)
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    # Stratified test split: every class is present in proportion.
    counts = torch.bincount(data.y_test, minlength=10)
    assert counts.min() >= 40


def test_digits_splits_are_disjoint() -> None:
    data = load_data(DataConfig())
    train, search, test = _rows(data.x_train), _rows(data.x_search), _rows(data.x_test)
    # All 1,797 digits images are distinct, so the splits must partition them exactly.
    assert not (train & test or train & search or search & test)
    assert len(train) + len(search) + len(test) == 1797


def test_digits_deterministic_per_seed() -> None:
    a, b = load_data(DataConfig(seed=1)), load_data(DataConfig(seed=1))
    c = load_data(DataConfig(seed=2))
    assert torch.equal(a.x_search, b.x_search) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_search, c.x_search)
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_cache_returns_independent_copies() -> None:
    a = load_data(DataConfig())
    a.x_train.zero_()
    assert load_data(DataConfig()).x_train.abs().sum() > 0


def test_digits_resize() -> None:
    data = load_data(DataConfig(resize=16))
    assert data.x_train.shape[1:] == (1, 16, 16) and data.input_shape == (1, 16, 16)


def test_search_size_too_big() -> None:
    with pytest.raises(DataError, match="search_size=1500"):
        load_data(DataConfig(search_size=1500))


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_nhwc_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (120, 10, 10, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (30, 10, 10, 3), dtype=np.uint8)
    path = _write_npz(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=np.arange(120) % 4,
        x_test=x_test,
        y_test=np.arange(30) % 4,
    )
    data = load_data(DataConfig(name="npz", path=str(path), search_size=20))
    assert data.sizes() == {"train": 100, "search": 20, "test": 30}
    assert (data.input_shape, data.num_classes) == ((3, 10, 10), 4)
    assert data.x_train.dtype == torch.float32
    # The channel axis was detected: per-channel means of the train split are ~0.
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    # Test images keep their order and are normalised with train statistics (NHWC -> NCHW).
    first = torch.from_numpy(x_test[0].transpose(2, 0, 1).astype(np.float32))
    corr = torch.corrcoef(torch.stack([first.flatten(), data.x_test[0].flatten()]))[0, 1]
    assert corr > 0.99


@pytest.mark.parametrize("shape", [(60, 8, 8), (60, 1, 8, 8), (60, 8, 8, 1), (60, 3, 8, 8)])
def test_npz_layouts_without_test_split(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    path = _write_npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(60) % 3)
    data = load_data(DataConfig(name="npz", path=str(path), search_size=10, test_fraction=0.2))
    assert data.sizes() == {"train": 38, "search": 10, "test": 12}
    assert data.x_train.shape[2:] == (8, 8)
    assert data.in_channels == (3 if 3 in shape[1:2] else 1)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"npz file not found: .*missing\.npz"):
        load_data(DataConfig(name="npz", path=str(tmp_path / "missing.npz")))
    x = np.zeros((50, 8, 8), np.float32)
    bad = _write_npz(tmp_path / "a.npz", x_train=x, labels=np.zeros(50))
    with pytest.raises(DataError, match=r"lacks array.*y_train"):
        load_data(DataConfig(name="npz", path=str(bad), search_size=10))
    bad = _write_npz(tmp_path / "b.npz", x_train=x, y_train=np.zeros(49, np.int64))
    with pytest.raises(DataError, match="50 images but y_train 49"):
        load_data(DataConfig(name="npz", path=str(bad), search_size=10))
    bad = _write_npz(tmp_path / "c.npz", x_train=x, y_train=np.zeros(50), x_test=x)
    with pytest.raises(DataError, match="y_test"):
        load_data(DataConfig(name="npz", path=str(bad), search_size=10))
    ok = _write_npz(tmp_path / "d.npz", x_train=x, y_train=np.zeros(50, np.int64))
    with pytest.raises(DataError, match="search_size=40"):
        load_data(DataConfig(name="npz", path=str(ok), search_size=40))


def _write_cifar(folder: Path, per_batch: int = 20, sub: bool = False) -> Path:
    """A tiny fake CIFAR-10 in the standard format: pickled dicts with bytes keys."""
    target = folder / "cifar-10-batches-py" if sub else folder
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with open(target / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


@pytest.mark.parametrize("sub", [False, True])
def test_cifar10_fake_batches(tmp_path: Path, sub: bool) -> None:
    folder = _write_cifar(tmp_path / "cifar", sub=sub)
    data = load_data(DataConfig(name="cifar10", path=str(folder), search_size=10))
    assert data.sizes() == {"train": 90, "search": 10, "test": 20}
    assert data.input_shape == (3, 32, 32)
    assert data.x_test.shape == (20, 3, 32, 32)


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar10 folder not found: .*nowhere"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path / "nowhere")))
    folder = _write_cifar(tmp_path / "cifar")
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        load_data(DataConfig(name="cifar10", path=str(folder)))


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path / "cifar")
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_data(DataConfig(name="cifar10", path=str(folder), search_size=10))


def test_iterate_batches() -> None:
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = list(iterate_batches(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = torch.cat([b[1] for b in iterate_batches(x, y, 3, shuffle=True, generator=g1)])
    s2 = torch.cat([b[1] for b in iterate_batches(x, y, 3, shuffle=True, generator=g2)])
    assert torch.equal(s1, s2) and not torch.equal(s1, y)
    assert torch.equal(s1.sort().values, y)


def test_subset_is_deterministic() -> None:
    data: DataSplits = load_data(DataConfig())
    xa, ya = data.subset("train", 50, seed=3)
    xb, yb = data.subset("train", 50, seed=3)
    assert len(ya) == 50 and torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="split must be"):
        data.subset("valid", 5)
