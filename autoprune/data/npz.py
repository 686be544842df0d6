"""Arrays in an ``.npz`` file: ``x_train, y_train`` and optionally ``x_test, y_test``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoprune.config import DataConfig
from autoprune.data.core import Arrays, DataError, register, to_labels, to_nchw

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(cfg: DataConfig) -> Arrays:
    """``x_train, y_train`` and optionally ``x_test, y_test`` (else a ``test_fraction`` split)."""
    path = Path(str(cfg.path))
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        present = set(npz.files)
        _check_npz_keys(present, path)
        arrays = {k: npz[k] for k in NPZ_KEYS if k in present}
    x_train = to_nchw(arrays["x_train"], f"{path}: x_train")
    y_train = to_labels(arrays["y_train"], f"{path}: y_train")
    if "x_test" not in arrays:
        return Arrays(x_train, y_train)
    x_test = to_nchw(arrays["x_test"], f"{path}: x_test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(
            f"{path}: x_test images {x_test.shape[1:]} differ from x_train {x_train.shape[1:]}"
        )
    return Arrays(x_train, y_train, x_test, to_labels(arrays["y_test"], f"{path}: y_test"))


def _check_npz_keys(present: set[str], path: Path) -> None:
    missing = [k for k in ("x_train", "y_train") if k not in present]
    if ("x_test" in present) != ("y_test" in present):
        missing.append("y_test" if "x_test" in present else "x_test")
    if missing:
        raise DataError(
            f"{path} lacks array(s) {', '.join(missing)} (found {', '.join(sorted(present))})"
        )


register("npz", _load_npz)
