"""Which module types are which, and who calls a module: one definition each, for every pass.

``CONV`` / ``CONV_T`` / ``BATCHNORM`` / ``INSTANCENORM`` / ``WEIGHTED`` are exact-type tuples
(subclasses with their own ``forward`` are not assumed to compute the same thing);
:func:`call_sites` counts the ``call_module`` nodes per module path (a module called at several
places shares its weights between them); :func:`module_of` is a node's module or ``None``.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCENORM: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
WEIGHTED: tuple[type[nn.Module], ...] = (*CONV, nn.Linear)
"""Layers whose weight has output channels on axis 0 and that qdq/sparsify/equalize rewrite."""

MAX_POOL: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOL: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
ADAPTIVE_MAX_POOL: tuple[type[nn.Module], ...] = (
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
POOL: tuple[type[nn.Module], ...] = (*MAX_POOL, *AVG_POOL, *ADAPTIVE_MAX_POOL)
DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
"""Identity in eval mode."""

MAX_POOL_FUNCS = frozenset({F.max_pool1d, F.max_pool2d, F.max_pool3d})
AVG_POOL_FUNCS = frozenset(
    {
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
    }
)
POOL_FUNCS = (
    MAX_POOL_FUNCS
    | AVG_POOL_FUNCS
    | {
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
    }
)
DROPOUT_FUNCS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d})


def call_sites(gm: fx.GraphModule) -> Counter[str]:
    """Module path -> how many ``call_module`` nodes call it."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else ``None``."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None
