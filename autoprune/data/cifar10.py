"""CIFAR-10 from the standard python-pickle batches in a local folder (never downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from autoprune.config import DataConfig
from autoprune.data.core import Arrays, DataError, register

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


def _load_cifar10(cfg: DataConfig) -> Arrays:
    folder = _cifar_folder(Path(str(cfg.path)))
    xs, ys = zip(*(_read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES), strict=True)
    x_test, y_test = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    return Arrays(np.concatenate(xs), np.concatenate(ys), x_test, y_test)


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


register("cifar10", _load_cifar10)
