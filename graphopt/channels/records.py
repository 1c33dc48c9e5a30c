"""The records of a channel analysis: index spaces, parameter members, node rewrites, groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Space:
    """One dim of one node output (``dims == (d,)``; an element per index), or a virtual
    space a rule creates (the heads of an ``nn.MultiheadAttention``)."""

    id: int
    node: str
    out: int  # which tensor of a tuple-returning node
    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    base: int
    inner: int  # the dim (absolute) that absorbs size changes

    @property
    def size(self) -> int:
        return math.prod(self.sizes)  # Python ints: np.prod costs ~10 us a call here

    def elements(self) -> np.ndarray:
        return self.base + np.arange(self.size)


@dataclass
class Member:
    """A tensor slot that shrinks with a space: ``owner.param`` along ``dim``.

    ``index_map[k]`` is the element of ``space`` that parameter index ``k`` belongs to.
    ``kind``: ``"out"`` (produces the space), ``"in"`` (consumes it) or ``"norm"``/``"attr"``.
    """

    owner: str  # module path ("" for get_attr targets on the root)
    param: str
    dim: int
    space: int
    index_map: np.ndarray
    kind: str


@dataclass
class Rewrite:
    """A node whose arguments must be recomputed after pruning."""

    node: str
    kind: str  # "reshape", "layer_norm", "split", "slice", "attention", "merge", "depthwise",
    # "unflatten", "aten_slice", "shape_tail"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Units that touch the same spaces; pruned with one ratio and ranked against each other."""

    id: int
    units: np.ndarray  # component labels
    spaces: tuple[int, ...]
    members: list[int]  # indices into ChannelAnalysis.members
    producers: list[str]
    stats_coupled: bool = False  # channels feed a LayerNorm/GroupNorm's statistics
    heads: bool = False  # units are attention heads (they reach the head axis of attention)

    @property
    def size(self) -> int:
        return len(self.units)
