"""Issue 14: IDX (MNIST / Fashion-MNIST) and image-folder sources, non-square inputs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.config import DataConfig
from autoprune.data import DataError, load_data
from autoprune.data import idx as idx_source


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, n_train: int, n_test: int, shape=(6, 5), gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train": (rng.integers(0, 255, (n_train, *shape)), np.arange(n_train) % 3),
        "test": (rng.integers(0, 255, (n_test, *shape)), (np.arange(n_test) + 1) % 3),
    }
    for split, (images, labels) in arrays.items():
        for stem, arr in zip(idx_source.FILES[split], (images, labels), strict=True):
            data = _idx_bytes(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads_with_the_official_test_split(tmp_path: Path, gz: bool):
    arrays = _write_idx(tmp_path, 60, 12, shape=(6, 5), gz=gz)
    data = load_data(DataConfig(name="mnist", path=str(tmp_path), search_size=15))
    assert data.sizes() == {"train": 45, "search": 15, "test": 12}
    assert data.input_shape == (1, 6, 5)  # non-square images stay non-square
    assert torch.equal(data.y_test, torch.as_tensor(arrays["test"][1]))
    assert data.num_classes == 3


def test_idx_errors_are_one_line(tmp_path: Path):
    _write_idx(tmp_path, 30, 5, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    cfg = DataConfig(name="mnist", path=str(tmp_path), search_size=10)
    images.write_bytes(b"\x08\x03" + good[2:])
    with pytest.raises(DataError, match=r"not an IDX file .bad magic number"):
        load_data(cfg)
    images.write_bytes(good[:-7])
    with pytest.raises(DataError, match=r"truncated: shape \(30, 6, 5\) needs"):
        load_data(cfg)
    images.write_bytes(good)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(29)))
    with pytest.raises(DataError, match=r"has 30 images but .* has 29 labels"):
        load_data(cfg)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_data(cfg)


def test_missing_fashion_mnist_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(idx_source, "FASHION_MNIST_FOLDER", tmp_path / "absent")
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*train-images"):
        load_data(DataConfig(name="fashion_mnist"))
    assert DataConfig(name="fashion_mnist").search_size == 5000  # AMC's held-out split
    with pytest.raises(ValueError, match=r"data\.path is required"):
        DataConfig(name="mnist")


def _png(path: Path, mode: str, size=(7, 9), value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8), mode).save(path)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder_classes_modes_and_test_fraction(tmp_path: Path, mode: str, channels: int):
    for c, name in enumerate(["cat", "bird", "dog"]):
        for i in range(8):
            _png(tmp_path / name / f"{i}.png", mode, value=10 * c + i)
    data = load_data(DataConfig(name="imagefolder", path=str(tmp_path), search_size=10,
                                test_fraction=0.25))  # fmt: skip
    assert data.input_shape == (channels, 9, 7)  # height 9, width 7
    assert data.num_classes == 3 and data.sizes() == {"train": 8, "search": 10, "test": 6}
    resized = load_data(DataConfig(name="imagefolder", path=str(tmp_path), search_size=10,
                                   resize=[12, 20]))  # fmt: skip
    assert resized.input_shape == (channels, 12, 20)


def test_image_folder_train_test_and_errors(tmp_path: Path):
    for split, n in (("train", 8), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", "L", value=i)
    data = load_data(DataConfig(name="imagefolder", path=str(tmp_path), search_size=10))
    assert data.sizes()["test"] == 4
    _png(tmp_path / "train" / "a" / "big.png", "L", size=(11, 11))
    with pytest.raises(DataError, match=r"different sizes.*data\.resize"):
        load_data(DataConfig(name="imagefolder", path=str(tmp_path), search_size=10))
    (tmp_path / "train" / "a" / "big.png").unlink()
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
        load_data(DataConfig(name="imagefolder", path=str(tmp_path), search_size=10))


def test_real_fashion_mnist_when_installed():
    folder = idx_source.FASHION_MNIST_FOLDER
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {folder} (apt-get install "
                    "dataset-fashion-mnist); this test runs only where it is")  # fmt: skip
    data = load_data(DataConfig(name="fashion_mnist"))
    assert data.sizes() == {"train": 55000, "search": 5000, "test": 10000}
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-3  # normalised with training statistics


def test_real_data_sets_get_their_training_defaults_per_model():
    from autoprune.config import TrainConfig, task_config

    fm = task_config(None, ["data.name=fashion_mnist"])  # resnet20: the data set's 8 epochs
    assert (fm.train.epochs, fm.train.batch_size, fm.train.finetune_augment) == (8, 128, True)
    vgg = task_config(None, ["data.name=fashion_mnist", "model.name=vgg11"])
    assert vgg.train.epochs == 2 and vgg.train.batch_size == 128  # fits the ~20 minutes
    mnist = task_config(None, ["data.name=mnist", "data.path=/x", "model.name=mobilenetv2"])
    assert mnist.train.epochs == 1
    chosen = task_config(None, ["data.name=fashion_mnist", "model.name=vgg11", "train.epochs=5"])
    assert chosen.train.epochs == 5  # what a config says wins
    digits = task_config(None, ["model.name=vgg11"])
    assert digits.train.epochs == TrainConfig().epochs  # digits keeps the plain defaults
