"""The vocabulary of a pruning space: granularities, units, the members a channel unit cuts.

A *unit* is one decision of a policy. For channel pruning it is a torch-pruning dependency group
(coupled layers that must lose the same channels, e.g. every conv writing into one residual
stage), named by its root module, the first conv/linear of the group in network order. For
fine-grained and N:M pruning it is one conv or linear weight tensor. :class:`SpaceError` is
what every step of building a space (:mod:`autoprune.engine.space`) raises on a refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

GRANULARITIES = ("channel", "fine", "nm")
UNIT_KINDS = ("conv", "dwconv", "linear")


class SpaceError(ValueError):
    """A pruning space cannot be built or a policy does not fit it.

    ``units`` names the channel units refused as unsupported (their root layers, valid
    ``ignore`` entries), when the error is such a refusal; empty otherwise."""

    def __init__(self, message: str, units: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.units = tuple(units)


@dataclass
class Member:
    """One layer (or bare parameter) a channel unit cuts, and which of its indices per root channel.

    ``idxs[j]`` is removed whenever root channel ``root_idxs[j]`` is (torch-pruning's index
    mapping: identity for coupled convs, an offset after a concatenation, one-to-many for a
    flatten into a linear layer). ``op`` says what is cut (see :mod:`autoprune.engine.surgery`):
    ``out`` / ``in`` channels of a conv or linear layer, ``dw`` both of a depthwise conv, ``ch``
    a per-channel layer (norm, PReLU), ``param`` a bare parameter along ``pruning_dim``.
    ``group_size`` > 0 marks a grouped layer (grouped conv, GroupNorm) whose groups of that many
    channels must all lose the same number of channels.
    """

    module: str
    op: str
    idxs: np.ndarray
    root_idxs: np.ndarray
    pruning_dim: int = 0
    group_size: int = 0
    _identity: bool | None = field(default=None, repr=False, compare=False)

    @property
    def is_out(self) -> bool:
        """Whether the unit's channels are this layer's outputs (a producer, not a consumer)."""
        return self.op != "in"

    def indices_for(self, removed_roots: np.ndarray) -> list[int]:
        """The module's indices to remove when the unit removes ``removed_roots``."""
        n = len(self.idxs)
        if self._identity is None:
            span = np.arange(n)
            same = np.array_equal(self.idxs, span) and np.array_equal(self.root_idxs, span)
            self._identity = bool(same)
        if self._identity:  # the usual mapping, root channel j is channel j: no search needed
            return removed_roots[removed_roots < n].tolist()
        return np.unique(self.idxs[np.isin(self.root_idxs, removed_roots)]).tolist()


@dataclass
class Unit:
    """One decision of a policy, with the features an agent observes (AMC's layer embedding)."""

    index: int
    name: str
    kind: str  # conv, dwconv or linear
    size: int  # channels (channel) or weights (fine / nm)
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    fmap: int  # input feature-map side
    macs: int  # dense MACs of the layers this unit shrinks
    params: int
    members: list[Member] = field(default_factory=list, repr=False)
    nm_eligible: bool = True
    cells: np.ndarray | None = field(default=None, repr=False)
    """Channel units feeding grouped layers: the cell of every root channel. Every cell loses
    the same number of channels, so every group of every grouped layer does (issue 13)."""

    @property
    def n_cells(self) -> int:
        return 1 if self.cells is None else int(self.cells.max()) + 1

    def features(self) -> dict[str, float]:
        """Raw (unscaled) state features of this unit."""
        return {
            "index": float(self.index),
            "kind": float(UNIT_KINDS.index(self.kind)),
            "in_channels": float(self.in_channels),
            "out_channels": float(self.out_channels),
            "stride": float(self.stride),
            "kernel": float(self.kernel),
            "fmap": float(self.fmap),
            "macs": float(self.macs),
        }
