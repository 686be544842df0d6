"""IDX files (the MNIST format): ``mnist`` and ``fashion_mnist``.

Each split is an images file (``uint8``, N x H x W) and a labels file (``uint8``, N), optionally
gzipped: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``. The official test files are
the test split. ``fashion_mnist`` defaults to the folder of Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.config import DataConfig
from autoprune.data.core import Arrays, DataError, register

FASHION_MNIST_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES: dict[int, Any] = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not) as an array; a malformed file is a one-line DataError."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes, has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) < need:
        raise DataError(
            f"{path} is truncated: shape {shape} needs {need} bytes, the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip's BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from exc


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_folder(cfg: DataConfig) -> Path:
    """The folder of an IDX data set, with a missing folder or file named in the error."""
    if cfg.path is None and cfg.name != "fashion_mnist":
        raise DataError(f"data.path is required for data.name={cfg.name!r} (the IDX folder)")
    folder = Path(cfg.path) if cfg.path is not None else FASHION_MNIST_FOLDER
    expected = [s for pair in FILES.values() for s in pair]
    hint = (
        " (apt-get install dataset-fashion-mnist installs it there)"
        if cfg.name == "fashion_mnist" and cfg.path is None
        else ""
    )
    if not folder.is_dir():
        raise DataError(
            f"{cfg.name} folder {folder} not found{hint}; it must hold "
            f"{', '.join(expected)} (each optionally .gz)"
        )
    missing = [s for s in expected if _find(folder, s) is None]
    if missing:
        raise DataError(f"{cfg.name} folder {folder} lacks {', '.join(missing)} (or .gz){hint}")
    return folder


def _split_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (_find(folder, s) for s in FILES[split])
    assert images_file is not None and labels_file is not None
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{images_file} / {labels_file}: expected N x H x W images and N labels, got "
            f"{images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels"
        )
    return images[:, None].astype(np.float32), labels.astype(np.int64)


def load_idx(cfg: DataConfig) -> Arrays:
    folder = idx_folder(cfg)
    x_train, y_train = _split_arrays(folder, "train")
    x_test, y_test = _split_arrays(folder, "test")
    return Arrays(x_train, y_train, x_test, y_test)


register("mnist", load_idx)
register("fashion_mnist", load_idx)
