"""Data sets and their deterministic train / search / test splits.

Sources, all offline, one module each behind a registry (``data.name``): ``digits``
(scikit-learn's bundled 8x8 digits, the embedded default), ``fashion_mnist`` and ``mnist`` (IDX
files; Fashion-MNIST from Debian's ``dataset-fashion-mnist`` by default), ``imagefolder`` (one
sub-folder per class of PNG / JPEG files), ``cifar10`` (python-pickle batches) and ``npz``.
A user's own tensors, ``Dataset``s or ``DataLoader``s become splits through
:func:`autoprune.data.user.user_splits`. See :mod:`autoprune.data.core` for the split model.
"""

from autoprune.data import cifar10, digits, idx, imagefolder, npz
from autoprune.data.core import (
    SOURCES,
    Arrays,
    DataError,
    DataSplits,
    Split,
    iterate_batches,
    load_data,
    register,
    split_arrays,
)

__all__ = [
    "SOURCES",
    "Arrays",
    "DataError",
    "DataSplits",
    "Split",
    "cifar10",
    "digits",
    "idx",
    "imagefolder",
    "iterate_batches",
    "load_data",
    "npz",
    "register",
    "split_arrays",
]
