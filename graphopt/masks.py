"""Weight masks for unstructured sparsity: chosen by magnitude (the ``sparsify`` pass), kept on
the Graph, re-applied by training loops (``distill``).

Masks are kept in ``graph.module.meta["graphopt.masks"]`` as ``{parameter name: bool tensor}``
(``True`` = kept), so they travel with ``Graph.copy()`` and ``torch.save`` of the module and
need no change to the module's forward. Training loops call :func:`apply_masks` after every
optimizer step, which keeps every masked weight exactly zero. A *schedule* stored beside the
masks (polynomial decay, Zhu & Gupta 2017) lets the loop raise the sparsity epoch by epoch:

    s_t = s_f + (s_i - s_f) · (1 - t / T)³,   t = 0..T epochs
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import GraphoptError

log = logging.getLogger(__name__)

MASKS_KEY = "graphopt.masks"
SCHEDULE_KEY = "graphopt.sparsity_schedule"


class SparsityError(GraphoptError):
    """A sparsity request that cannot be honoured (e.g. it would zero a whole layer)."""


@dataclass
class Schedule:
    """Raise sparsity from ``initial`` to ``final`` over ``epochs`` epochs of the next training."""

    final: float
    epochs: int
    initial: float = 0.0
    scope: str = "layer"
    block: int = 1

    def at(self, epoch: int) -> float:
        t = min(max(epoch, 0), self.epochs) / max(self.epochs, 1)
        return self.final + (self.initial - self.final) * (1 - t) ** 3


def masks_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    meta = getattr(module, "meta", None)
    if meta is None:
        return {}
    return meta.get(MASKS_KEY, {})


def set_masks(module: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    module.meta[MASKS_KEY] = masks


def schedule_of(module: torch.nn.Module) -> Schedule | None:
    raw = getattr(module, "meta", {}).get(SCHEDULE_KEY)
    return Schedule(**raw) if raw else None


def set_schedule(module: torch.nn.Module, schedule: Schedule | None) -> None:
    if schedule is None:
        module.meta.pop(SCHEDULE_KEY, None)
    else:
        module.meta[SCHEDULE_KEY] = asdict(schedule)


@torch.no_grad()
def apply_masks(module: torch.nn.Module) -> int:
    """Zero every masked weight in place; return how many masks were applied. A mask whose
    shape no longer fits its parameter (a later pass reshaped it) is dropped with a warning."""
    masks = masks_of(module)
    params = dict(module.named_parameters())
    stale = []
    for name, mask in masks.items():
        p = params.get(name)
        if p is None or p.shape != mask.shape:
            stale.append(name)
            continue
        p.mul_(mask.to(p.dtype))
    for name in stale:
        log.warning("sparsity mask for %s no longer fits its parameter; dropped", name)
        masks.pop(name)
    return len(masks)


def _block_scores(w: torch.Tensor, block: int) -> torch.Tensor:
    """|w| per weight, or for ``block > 1`` the L2 norm of each run of ``block`` consecutive
    input weights (the last dimension of the flattened ``[out, in·k]`` matrix), broadcast back."""
    a = w.detach().abs().float()
    if block <= 1:
        return a
    flat = a.reshape(a.shape[0], -1)
    cols = flat.shape[1]
    pad = (-cols) % block
    padded = torch.nn.functional.pad(flat, (0, pad))
    norms = padded.reshape(flat.shape[0], -1, block).norm(dim=2)
    return norms.repeat_interleave(block, dim=1)[:, :cols].reshape(a.shape)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest entries; ties broken by flat index (stable sort)."""
    flat = scores.flatten()
    order = torch.sort(flat, stable=True).indices
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[order[:k]] = True
    return drop.reshape(scores.shape)


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "layer",
    block: int = 1,
) -> dict[str, torch.Tensor]:
    """Kept-weight masks by magnitude.

    ``threshold``: keep ``|w| >= threshold``. ``sparsity`` s with ``scope=layer``: drop the
    ``⌊s·n⌋`` smallest of each layer's ``n`` weights; with ``scope=global``: drop the
    ``⌊s·N⌋`` smallest across all layers together. Ties go to the lower flat index, layers in
    the order given. Refuses (naming the layer) a mask that would zero a whole layer.
    """
    scores = {name: _block_scores(w, block) for name, w in weights.items()}
    drops: dict[str, torch.Tensor] = {}
    if threshold is not None:
        drops = {name: s < threshold for name, s in scores.items()}
    elif scope == "global":
        names = list(scores)
        flat = torch.cat([scores[n].flatten() for n in names])
        k = math.floor((sparsity or 0.0) * flat.numel())
        drop_flat = _smallest(flat, k).flatten()
        start = 0
        for n in names:
            size = scores[n].numel()
            drops[n] = drop_flat[start : start + size].reshape(scores[n].shape)
            start += size
    else:
        for name, s in scores.items():
            drops[name] = _smallest(s, math.floor((sparsity or 0.0) * s.numel()))
    for name, drop in drops.items():
        if bool(drop.all()):
            raise SparsityError(
                f"sparsify: every weight of {name} would be zeroed; lower the sparsity or "
                f"threshold, or add the layer to skip"
            )
    return {name: ~drop for name, drop in drops.items()}


def storage_bytes(mask: torch.Tensor, value_bytes: int) -> dict[str, int]:
    """Bytes to store a layer dense, as a bitmap plus packed non-zeros, and with one-byte
    relative indices (Deep Compression: the gap to the previous non-zero, with a filler zero
    stored whenever a gap exceeds 255)."""
    n = mask.numel()
    flat = mask.flatten().nonzero().flatten()
    nnz = len(flat)
    gaps = torch.diff(flat, prepend=torch.tensor([-1])) if nnz else flat
    fillers = int(((gaps - 1) // 256).clamp(min=0).sum()) if nnz else 0
    return {
        "dense": n * value_bytes,
        "bitmap": (n + 7) // 8 + nnz * value_bytes,
        "relative": (nnz + fillers) * (value_bytes + 1),
    }


def summary(module: torch.nn.Module) -> dict[str, Any]:
    """Per-layer and overall sparsity of the masked parameters."""
    params = dict(module.named_parameters())
    layers = {}
    zeros = total = 0
    for name in masks_of(module):
        p = params[name]
        z = int((p.detach() == 0).sum())
        layers[name] = {"weights": p.numel(), "zeros": z, "sparsity": z / p.numel()}
        zeros += z
        total += p.numel()
    return {"layers": layers, "sparsity": zeros / total if total else 0.0}
