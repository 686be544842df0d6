"""Data sets and their deterministic train / search / test splits.

Three sources, all offline: ``digits`` (scikit-learn's bundled 8x8 digits, the embedded default),
``cifar10`` (the standard python-pickle batches in a local folder) and ``npz`` (arrays in a file).
Following AMC (He et al., ECCV 2018), the *search* split that judges policies is held out of the
training data, so a search never looks at the test split. Images are float32 NCHW tensors
normalised per channel with training statistics; labels are int64.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor

from autoprune.config import DataConfig


class DataError(ValueError):
    """Data that cannot be loaded or split; the message names the file, key or setting."""


@dataclass
class DataSplits:
    """Train / search / test tensors of one data set, plus what a model needs to know of it."""

    x_train: Tensor
    y_train: Tensor
    x_search: Tensor
    y_search: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {"train": len(self.y_train), "search": len(self.y_search), "test": len(self.y_test)}

    def clone(self) -> DataSplits:
        """A copy whose tensors share no memory with this one."""
        return self._map(Tensor.clone)

    def to(self, device: torch.device | str) -> DataSplits:
        """A copy with every tensor on ``device`` (e.g. to keep a GPU evaluator's data resident)."""
        return self._map(lambda t: t.to(device))

    def subset(self, split: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A deterministic random sample of ``n`` images (all if fewer) of one split."""
        if split not in ("train", "search", "test"):
            raise ValueError(f"split must be 'train', 'search' or 'test', got {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if n >= len(y):
            return x, y
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DataSplits:
        return replace(
            self,
            x_train=fn(self.x_train),
            y_train=fn(self.y_train),
            x_search=fn(self.x_search),
            y_search=fn(self.y_search),
            x_test=fn(self.x_test),
            y_test=fn(self.y_test),
        )


@dataclass
class _Arrays:
    """Raw arrays of a source before splitting: NCHW images, integer labels; test optional."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def load_data(cfg: DataConfig) -> DataSplits:
    """Load ``cfg.name`` and split it into train / search / test (deterministic per ``cfg.seed``).

    Raises :class:`DataError` for missing files or keys, inconsistent arrays, or a search split
    that does not fit in the training data.
    """
    if cfg.name == "digits":
        # Tasks are built often (every evaluator worker); digits splits are cached in-process.
        return _digits_splits(cfg.resize, cfg.search_size, cfg.test_fraction, cfg.seed).clone()
    loader = _LOADERS.get(cfg.name)
    if loader is None:
        raise DataError(f"unknown data set {cfg.name!r}; known: {', '.join(_LOADERS)}")
    return _split(loader(cfg), cfg)


@functools.lru_cache(maxsize=16)
def _digits_splits(
    resize: int | None, search_size: int, test_fraction: float, seed: int
) -> DataSplits:
    cfg = DataConfig(
        name="digits",
        resize=resize,
        search_size=search_size,
        test_fraction=test_fraction,
        seed=seed,
    )
    return _split(_load_digits(cfg), cfg)


def _load_digits(cfg: DataConfig) -> _Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _Arrays(bunch.images[:, None].astype(np.float32), bunch.target.astype(np.int64))


# ---------------------------------------------------------------- CIFAR-10 (python pickles)

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


def _load_cifar10(cfg: DataConfig) -> _Arrays:
    folder = _cifar_folder(Path(str(cfg.path)))
    xs, ys = zip(*(_read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES), strict=True)
    x_test, y_test = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    return _Arrays(np.concatenate(xs), np.concatenate(ys), x_test, y_test)


def _cifar_folder(path: Path) -> Path:
    """``path`` or ``path/cifar-10-batches-py``, whichever holds all six batch files."""
    if not path.is_dir():
        raise DataError(f"cifar10 folder not found: {path}")
    needed = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    for folder in (path, path / "cifar-10-batches-py"):
        if all((folder / f).is_file() for f in needed):
            return folder
    missing = [f for f in needed if not (path / f).is_file()]
    raise DataError(
        f"cifar10 folder {path} (or its cifar-10-batches-py subfolder) lacks {', '.join(missing)}"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists and numpy arrays: a data file must not be able to run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in dict(raw).items()}
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path} has no {key!r} entry (found {sorted(batch)})")
    x = np.asarray(batch["data"], dtype=np.uint8)
    y = np.asarray(batch["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DataError(f"{path}: expected data (N, 3072) and N labels, got {x.shape}, {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


# ---------------------------------------------------------------- npz

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(cfg: DataConfig) -> _Arrays:
    """``x_train, y_train`` and optionally ``x_test, y_test`` (else a ``test_fraction`` split)."""
    path = Path(str(cfg.path))
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        present = set(npz.files)
        _check_npz_keys(present, path)
        arrays = {k: npz[k] for k in NPZ_KEYS if k in present}
    x_train = _to_nchw(arrays["x_train"], f"{path}: x_train")
    y_train = _labels(arrays["y_train"], f"{path}: y_train")
    if "x_test" not in arrays:
        return _Arrays(x_train, y_train)
    x_test = _to_nchw(arrays["x_test"], f"{path}: x_test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(
            f"{path}: x_test images {x_test.shape[1:]} differ from x_train {x_train.shape[1:]}"
        )
    return _Arrays(x_train, y_train, x_test, _labels(arrays["y_test"], f"{path}: y_test"))


def _check_npz_keys(present: set[str], path: Path) -> None:
    missing = [k for k in ("x_train", "y_train") if k not in present]
    if ("x_test" in present) != ("y_test" in present):
        missing.append("y_test" if "x_test" in present else "x_test")
    if missing:
        raise DataError(
            f"{path} lacks array(s) {', '.join(missing)} (found {', '.join(sorted(present))})"
        )


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """NHW, NHWC or NCHW (1, 3 or 4 channels) -> NCHW float32; the channel axis is detected."""
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what}: expected numbers, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise DataError(f"{what}: cannot tell the channel axis of shape {x.shape}")
    else:
        raise DataError(f"{what}: expected NHW, NHWC or NCHW images, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector of labels
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or _whole(y)):
        raise DataError(f"{what}: expected a 1-D array of integer class labels, got {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, found {y.min()}")
    return y.astype(np.int64)


def _whole(y: np.ndarray) -> bool:
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))


_LOADERS: dict[str, Callable[[DataConfig], _Arrays]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "npz": _load_npz,
}


# ---------------------------------------------------------------- splitting and normalisation


def _split(arrays: _Arrays, cfg: DataConfig) -> DataSplits:
    """Carve test (if the source has none) and search splits, then normalise and resize."""
    _check_lengths(arrays, cfg.name)
    x_train, y_train, x_test, y_test = arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test
    if x_test is None or y_test is None:
        _check_room(len(y_train) - math.ceil(cfg.test_fraction * len(y_train)), cfg)
        x_train, x_test, y_train, y_test = _stratified(
            x_train, y_train, cfg.test_fraction, cfg.seed
        )
    _check_room(len(y_train), cfg)
    x_train, x_search, y_train, y_search = _stratified(
        x_train, y_train, cfg.search_size, cfg.seed + 1
    )
    mean, std = _channel_stats(x_train)
    xs = [_prepare(x, mean, std, cfg.resize) for x in (x_train, x_search, x_test)]
    labels = np.concatenate([y_train, y_search, y_test])
    return DataSplits(
        x_train=xs[0],
        y_train=torch.from_numpy(y_train),
        x_search=xs[1],
        y_search=torch.from_numpy(y_search),
        x_test=xs[2],
        y_test=torch.from_numpy(y_test),
        num_classes=int(labels.max()) + 1,
        in_channels=int(xs[0].shape[1]),
        image_size=int(xs[0].shape[2]),
        name=cfg.name,
    )


def _check_lengths(arrays: _Arrays, name: str) -> None:
    pairs = [("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)]
    for split, x, y in pairs:
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"{name}: x_{split} has {len(x)} images but y_{split} {len(y)} labels")
    if len(arrays.y_train) == 0:
        raise DataError(f"{name}: the training set is empty")


def _check_room(n_train: int, cfg: DataConfig) -> None:
    if cfg.search_size >= n_train:
        raise DataError(
            f"data.search_size={cfg.search_size} does not fit in the training set of {cfg.name} "
            f"({n_train} images); it must leave at least one training image"
        )


def _stratified(
    x: np.ndarray, y: np.ndarray, held_out: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off ``held_out`` (a fraction or a count), stratified by class where possible."""
    try:
        out = train_test_split(x, y, test_size=held_out, random_state=seed, stratify=y)
    except ValueError:  # a class with a single image, or fewer held-out images than classes
        out = train_test_split(x, y, test_size=held_out, random_state=seed)
    return out[0], out[1], out[2], out[3]


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std as (C, 1, 1) arrays, accumulated in float64 chunk by chunk."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std > 1e-8, std, 1.0)  # a constant channel is only centred
    return mean[:, None, None].astype(np.float32), std[:, None, None].astype(np.float32)


def _prepare(x: np.ndarray, mean: np.ndarray, std: np.ndarray, resize: int | None) -> Tensor:
    arr = x.astype(np.float32)  # a copy: the caller's arrays stay untouched
    arr -= mean
    arr /= std
    t = torch.from_numpy(arr)
    if resize is not None and tuple(t.shape[2:]) != (resize, resize):
        t = F.interpolate(t, size=(resize, resize), mode="bilinear", align_corners=False)
    return t.contiguous()


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(xb, yb)`` mini-batches; the last may be smaller. Shuffles with ``generator``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(y)
    if shuffle:
        order = torch.randperm(n, generator=generator)
        x, y = x[order.to(x.device)], y[order.to(y.device)]
    for start in range(0, n, batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
