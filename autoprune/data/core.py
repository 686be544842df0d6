"""Data splits: train / search / test, in memory or streamed from a ``Dataset``.

Following AMC (He et al., ECCV 2018), the *search* split that judges policies is held out of the
training data, so a search never looks at the test split. A split is either in-memory tensors
(float32 NCHW images normalised per channel with training statistics, int64 labels: the fast
path, used by the built-in sources) or a user's ``Dataset`` / ``DataLoader`` read batch by batch
(data that does not fit in memory). Sources register a loader returning raw :class:`Arrays`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from autoprune.config import DataConfig


class DataError(ValueError):
    """Data that cannot be loaded or split; the message names the file, key or setting."""


class Split:
    """One split: tensors ``x, y`` in memory, a map-style ``Dataset`` of ``(x, y)`` items that is
    batched here, or a ``DataLoader`` iterated as given (its own batch size, order and workers).
    """

    def __init__(
        self,
        x: Tensor | None = None,
        y: Tensor | None = None,
        source: Dataset | DataLoader | None = None,
    ) -> None:
        if (x is None) == (source is None) or (x is None) != (y is None):
            raise DataError("a split is either tensors x and y or one Dataset / DataLoader")
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"a split has {len(x)} images but {len(y)} labels")
        self.x, self.y, self.source = x, y, source

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    def __len__(self) -> int:
        if self.y is not None:
            return len(self.y)
        if isinstance(self.source, DataLoader):
            return len(self.source.dataset)  # type: ignore[arg-type]
        return len(self.source)  # type: ignore[arg-type]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` mini-batches (a DataLoader keeps its own batch size and order)."""
        if self.x is not None and self.y is not None:
            yield from iterate_batches(self.x, self.y, batch_size, shuffle, generator)
            return
        loader = self.source
        if not isinstance(loader, DataLoader):
            loader = DataLoader(loader, batch_size, shuffle=shuffle, generator=generator)  # type: ignore[arg-type]
        for batch in loader:
            yield _xy(batch)

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A deterministic random sample of ``n`` items (all if fewer) as tensors: drawn from
        the tensors or the (map-style) dataset, through a DataLoader's own ``collate_fn``; an
        iterable dataset gives its first ``n`` items."""
        if self.x is not None and self.y is not None:
            if n >= len(self.y):
                return self.x, self.y
            idx = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))[:n]
            return self.x[idx], self.y[idx]
        dataset, collate = self.source, default_collate
        if isinstance(self.source, DataLoader):
            dataset, collate = self.source.dataset, self.source.collate_fn
            if isinstance(dataset, IterableDataset):
                return _take(self.batches(1), n)
        total = len(self)
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n, total)]
        return _xy(collate([dataset[int(i)] for i in idx]))  # type: ignore[index]

    def head(self, n: int, seed: int = 0) -> Split:
        """A fixed, seeded sample of ``n`` items as a split of its own (all if fewer)."""
        if n >= len(self):
            return self
        if self.x is not None:
            return Split(*self.sample(n, seed))
        if isinstance(self.source, DataLoader):
            raise DataError("a DataLoader split cannot be subsampled: pass a smaller loader")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(source=Subset(self.source, idx.tolist()))  # type: ignore[arg-type]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Split:
        """The same split with ``fn`` applied to in-memory tensors (a stream is shared)."""
        if self.x is None or self.y is None:
            return self
        return Split(fn(self.x), fn(self.y))


def _xy(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise DataError(f"a data item must be an (input, label) pair, got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    return torch.as_tensor(x), torch.as_tensor(y)


def _take(batches: Iterable[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    xs, ys, seen = [], [], 0
    for xb, yb in batches:
        xs.append(xb)
        ys.append(yb)
        seen += len(yb)
        if seen >= n:
            break
    if not xs:
        raise DataError("the data loader yields no batches")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


@dataclass
class DataSplits:
    """Train / search / test splits of one data set, plus what a model needs to know of it."""

    train: Split
    search: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # one sample: (channels, height, width)
    name: str

    @classmethod
    def from_tensors(
        cls,
        x_train: Tensor,
        y_train: Tensor,
        x_search: Tensor,
        y_search: Tensor,
        x_test: Tensor,
        y_test: Tensor,
        num_classes: int | None = None,
        name: str = "tensors",
    ) -> DataSplits:
        """In-memory splits; ``num_classes`` defaults to the largest label + 1."""
        labels = torch.cat([y_train, y_search, y_test])
        return cls(
            Split(x_train, y_train),
            Split(x_search, y_search),
            Split(x_test, y_test),
            num_classes=int(num_classes or int(labels.max()) + 1),
            input_shape=tuple(int(s) for s in x_train.shape[1:]),
            name=name,
        )

    @property
    def in_channels(self) -> int:
        return int(self.input_shape[0])

    @property
    def in_memory(self) -> bool:
        return self.train.in_memory and self.search.in_memory and self.test.in_memory

    def split(self, name: str) -> Split:
        if name not in ("train", "search", "test"):
            raise ValueError(f"split must be 'train', 'search' or 'test', got {name!r}")
        return getattr(self, name)  # type: ignore[no-any-return]

    # in-memory tensors (the built-in sources); a streamed split has none
    def _tensor(self, split: str, which: str) -> Tensor:
        t = getattr(self.split(split), which)
        if t is None:
            raise DataError(f"the {split} split is streamed from a Dataset: it has no tensors")
        return t  # type: ignore[no-any-return]

    x_train = property(lambda self: self._tensor("train", "x"))
    y_train = property(lambda self: self._tensor("train", "y"))
    x_search = property(lambda self: self._tensor("search", "x"))
    y_search = property(lambda self: self._tensor("search", "y"))
    x_test = property(lambda self: self._tensor("test", "x"))
    y_test = property(lambda self: self._tensor("test", "y"))

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {"train": len(self.train), "search": len(self.search), "test": len(self.test)}

    def clone(self) -> DataSplits:
        """A copy whose tensors share no memory with this one (streams are shared)."""
        return self._map(Tensor.clone)

    def to(self, device: torch.device | str) -> DataSplits:
        """A copy with every in-memory tensor on ``device``."""
        return self._map(lambda t: t.to(device))

    def subset(self, split: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A deterministic random sample of ``n`` images (all if fewer) of one split."""
        return self.split(split).sample(n, seed)

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return self.split(split).batches(batch_size, shuffle, generator)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DataSplits:
        return replace(self, train=self.train.map(fn), search=self.search.map(fn),
                       test=self.test.map(fn))  # fmt: skip


@dataclass
class Arrays:
    """Raw arrays of a source before splitting: NCHW images, integer labels; test optional."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


Loader = Callable[[DataConfig], "Arrays | DataSplits"]
SOURCES: dict[str, Loader] = {}


def register(name: str, loader: Loader) -> None:
    """Make a data source available as ``data.name``."""
    SOURCES[name] = loader


def load_data(cfg: DataConfig) -> DataSplits:
    """Load ``cfg.name`` and split it into train / search / test (deterministic per ``cfg.seed``).

    Raises :class:`DataError` for missing files or keys, inconsistent arrays, or a search split
    that does not fit in the training data.
    """
    loader = SOURCES.get(cfg.name)
    if loader is None:
        raise DataError(f"unknown data set {cfg.name!r}; known: {', '.join(SOURCES)}")
    out = loader(cfg)
    return out if isinstance(out, DataSplits) else split_arrays(out, cfg)


# ---------------------------------------------------------------- array helpers for sources


def to_nchw(x: np.ndarray, what: str) -> np.ndarray:
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


def to_labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector of labels
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or _whole(y)):
        raise DataError(f"{what}: expected a 1-D array of integer class labels, got {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, found {y.min()}")
    return y.astype(np.int64)


def _whole(y: np.ndarray) -> bool:
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))


def split_arrays(arrays: Arrays, cfg: DataConfig) -> DataSplits:
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
    xs = [_prepare(x, mean, std, cfg.resize_hw) for x in (x_train, x_search, x_test)]
    labels = np.concatenate([y_train, y_search, y_test])
    return DataSplits(
        Split(xs[0], torch.from_numpy(y_train)),
        Split(xs[1], torch.from_numpy(y_search)),
        Split(xs[2], torch.from_numpy(y_test)),
        num_classes=int(labels.max()) + 1,
        input_shape=tuple(int(s) for s in xs[0].shape[1:]),
        name=cfg.name,
    )


def _check_lengths(arrays: Arrays, name: str) -> None:
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
    from sklearn.model_selection import train_test_split  # 1-2 s to import: only when splitting

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


def _prepare(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray, resize: tuple[int, int] | None
) -> Tensor:
    arr = x.astype(np.float32)  # a copy: the caller's arrays stay untouched
    arr -= mean
    arr /= std
    t = torch.from_numpy(arr)
    if resize is not None and tuple(t.shape[2:]) != resize:
        t = F.interpolate(t, size=resize, mode="bilinear", align_corners=False)
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
