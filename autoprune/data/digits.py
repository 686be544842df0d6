"""scikit-learn's bundled 8x8 digits (1,797 images): the embedded default, nothing to install."""

from __future__ import annotations

import functools

import numpy as np

from autoprune.config import DataConfig
from autoprune.data.core import Arrays, DataSplits, register, split_arrays


def load_digits_arrays(cfg: DataConfig) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Arrays(bunch.images[:, None].astype(np.float32), bunch.target.astype(np.int64))


@functools.lru_cache(maxsize=16)
def _digits_splits(cfg_json: str) -> DataSplits:
    cfg = DataConfig.model_validate_json(cfg_json)
    return split_arrays(load_digits_arrays(cfg), cfg)


def load_digits(cfg: DataConfig) -> DataSplits:
    """Tasks are built often (every evaluator worker): digits splits are cached in-process."""
    return _digits_splits(cfg.model_dump_json()).clone()


register("digits", load_digits)
