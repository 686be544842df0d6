"""A user's own data as splits: tensors, ``Dataset``s or ``DataLoader``s (issue 14).

``train`` (batch-norm recalibration and fine-tuning) and ``test`` (the final judgement) are
required; ``search`` (what searches score) is carved from ``train`` when not given, as AMC does,
so a search never sees the test data. Tensors stay in memory (the fast path); a ``Dataset`` is
read batch by batch; a ``DataLoader`` is iterated as given (its batch size, order and workers).
Items must be ``(input, label)`` pairs with integer class labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from autoprune.data.core import DataError, DataSplits, Split

DataLike = tuple[Tensor, Tensor] | Dataset | DataLoader


def as_split(data: Any, what: str) -> Split:
    """One split from tensors ``(x, y)``, a map-style ``Dataset`` or a ``DataLoader``."""
    if isinstance(data, Split):
        split = data
    elif isinstance(data, DataLoader):
        split = Split(source=data)
    elif isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels")
        split = Split(x, _class_indices(y, what))
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        split = Split(source=data)
    else:
        raise DataError(
            f"{what}: expected a (inputs, labels) pair of tensors, a map-style Dataset or a "
            f"DataLoader, got {type(data).__name__}"
        )
    if len(split) == 0:
        raise DataError(f"{what} is empty")
    return split


def carve_search(train: Split, size: int, seed: int) -> tuple[Split, Split]:
    """Hold ``size`` random items of ``train`` out as the search split (seeded)."""
    n = len(train)
    if size >= n:
        raise DataError(
            f"search_size={size} does not fit in the {n} training items; pass a search split"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:size], order[size:]
    if train.x is not None and train.y is not None:
        return Split(train.x[kept], train.y[kept]), Split(train.x[held], train.y[held])
    if isinstance(train.source, DataLoader):
        raise DataError(
            "a training DataLoader cannot be split: pass a search split too, or the Dataset"
        )
    dataset: Dataset = train.source  # type: ignore[assignment]
    return Split(source=Subset(dataset, kept.tolist())), Split(
        source=Subset(dataset, held.tolist())
    )


def user_splits(
    train: Any,
    test: Any,
    search: Any = None,
    search_size: int = 500,
    seed: int = 0,
    num_classes: int | None = None,
    name: str = "user",
) -> DataSplits:
    """Splits of a user's data; the input shape and class count are read from the data."""
    train_split = as_split(train, "train data")
    test_split = as_split(test, "test data")
    if search is None:
        train_split, search_split = carve_search(train_split, search_size, seed)
    else:
        search_split = as_split(search, "search data")
    splits = {"train": train_split, "search": search_split, "test": test_split}
    # the training data's shape is the reference (the search split may be carved from it)
    shape = tuple(int(s) for s in train_split.sample(1, seed)[0].shape[1:])
    for what in ("search", "test"):
        other = tuple(int(s) for s in splits[what].sample(1, seed)[0].shape[1:])
        if other != shape:
            raise DataError(f"{what} inputs have shape {other}, training inputs {shape}")
    low, high = None, None
    for what, split in splits.items():
        y = checked_labels(split, seed)
        if y.dtype.is_floating_point or y.dim() != 1:
            raise DataError(
                f"{what} labels must be 1-D integer class indices, got {y.dtype} {tuple(y.shape)}"
            )
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{what} labels must be class indices >= 0, got {int(y.min())}")
        if num_classes is not None and len(y) and int(y.max()) >= num_classes:
            raise DataError(f"{what} labels reach {int(y.max())}, beyond num_classes={num_classes}")
        low = int(y.min()) if low is None else min(low, int(y.min()))
        high = int(y.max()) if high is None else max(high, int(y.max()))
    classes = num_classes if num_classes is not None else int(high or 0) + 1
    return DataSplits(train_split, search_split, test_split, classes, shape, name)


LABEL_SAMPLE = 512
"""Labels read per split that is not in memory (Dataset / DataLoader) to check their range;
tensor splits are checked in full."""


def checked_labels(split: Split, seed: int = 0) -> Tensor:
    """The labels a range check reads: all of a tensor split, ``LABEL_SAMPLE`` seeded items of
    a Dataset or DataLoader (reading every item of data that may not fit in memory would cost a
    pass over it before any work)."""
    return split.y if split.y is not None else split.sample(LABEL_SAMPLE, seed)[1]


def _class_indices(y: Tensor, what: str) -> Tensor:
    """Tensor labels as int64 class indices; fractional or non-finite labels are refused (a cast
    would turn 0.7 into class 0 silently)."""
    fractional = y.dtype.is_floating_point and (
        not bool(torch.isfinite(y).all()) or bool((y != y.round()).any())
    )
    if fractional:
        raise DataError(
            f"{what}: labels must be integer class indices, got fractional or non-finite "
            f"values ({y.dtype})"
        )
    return y.long()
