"""``sparsify``: unstructured magnitude sparsity of conv and linear weights.

One shot: zero every weight with ``|w| < threshold`` (the seed's example, 1e-3), or the
``⌊s·n⌋`` smallest-magnitude weights per layer (``scope=layer``) or across the model
(``scope=global``). With ``block=N`` runs of N consecutive input weights are kept or dropped
together, scored by their L2 norm. ``schedule=polynomial`` instead stores a schedule that the
next training pass (``distill``) follows, raising sparsity to ``s`` over its epochs as
``s_t = s·(1 - (1 - t/T)³)``. Either way the masks stay on the Graph and training keeps
masked weights exactly zero (:mod:`graphopt.masks`).

The first convolution and the last linear layer (the classifier) stay dense by default
(``keep-ends=false`` to include them); ``skip`` adds module-path globs. The report gives the
sparsity per layer and overall and what the sparse layers would take stored compressed.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch.fx as fx
from torch import nn

from graphopt.errors import OptionError
from graphopt.graph import Graph
from graphopt.masks import (
    Schedule,
    magnitude_masks,
    masks_of,
    set_masks,
    set_schedule,
    storage_bytes,
    summary,
)
from graphopt.optypes import WEIGHTED
from graphopt.pass_api import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

_WEIGHTED = WEIGHTED


@dataclass(frozen=True)
class SparsifyOptions:
    sparsity: float | None = field(
        default=None, metadata={"help": "fraction of weights zeroed, in [0, 1) (default 0.5)"}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "zero weights with |w| below this (instead of sparsity)"}
    )
    scope: Literal["layer", "global"] = field(
        default="layer", metadata={"help": "rank within each layer or across all of them"}
    )
    schedule: Literal["oneshot", "polynomial"] = field(
        default="oneshot", metadata={"help": "now, or polynomially over the next training"}
    )
    block: int = field(default=1, metadata={"help": "keep/drop runs of N input weights together"})
    skip: tuple[str, ...] = field(default=(), metadata={"help": "module-path globs kept dense"})
    keep_ends: bool = field(
        default=True, metadata={"help": "keep the first conv and the classifier dense"}
    )

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.threshold is not None:
            raise OptionError("sparsify: give sparsity or threshold, not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"sparsify: sparsity must be in [0, 1), got {self.sparsity}")
        if self.threshold is not None and self.threshold < 0:
            raise OptionError(f"sparsify: threshold must be >= 0, got {self.threshold}")
        if self.block < 1:
            raise OptionError(f"sparsify: block must be >= 1, got {self.block}")
        if self.schedule == "polynomial" and self.threshold is not None:
            raise OptionError("sparsify: schedule=polynomial needs sparsity, not threshold")

    @property
    def target(self) -> float:
        return 0.5 if self.sparsity is None else self.sparsity


def _weighted_nodes(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """``(module path, module)`` of conv / linear module calls, in graph order, once each."""
    seen, out = set(), []
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target not in seen:
            mod = gm.get_submodule(n.target)
            if isinstance(mod, _WEIGHTED):
                seen.add(n.target)
                out.append((str(n.target), mod))
    return out


def select_layers(gm: fx.GraphModule, opts: SparsifyOptions) -> tuple[list[str], dict[str, str]]:
    """The module paths to sparsify, and the skipped ones with the reason."""
    layers = _weighted_nodes(gm)
    skipped: dict[str, str] = {}
    if opts.keep_ends and layers:
        convs = [p for p, m in layers if not isinstance(m, nn.Linear)]
        linears = [p for p, m in layers if isinstance(m, nn.Linear)]
        if convs:
            skipped[convs[0]] = "first convolution (keep-ends)"
        if linears:
            skipped[linears[-1]] = "classifier (keep-ends)"
    for path, _ in layers:
        if any(fnmatch.fnmatchcase(path, g) for g in opts.skip):
            skipped.setdefault(path, "skip")
    return [p for p, _ in layers if p not in skipped], skipped


class Sparsify(Pass):
    """Unstructured magnitude sparsity (threshold or fraction); masks kept through training."""

    name = "sparsify"
    exact = False
    Options = SparsifyOptions

    @classmethod
    def needs_training_after(cls, options: SparsifyOptions) -> str | None:
        if options.schedule == "polynomial":
            return "schedule=polynomial only sets masks that tighten during training"
        return None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts: SparsifyOptions = self.options
        gm = graph.module
        chosen, skipped = select_layers(gm, opts)
        if not chosen:
            return PassResult(
                False, {"summary": "no conv/linear layer to sparsify", "skipped": skipped}
            )
        weights = {f"{p}.weight": gm.get_submodule(p).weight for p in chosen}
        masks = dict(masks_of(gm))
        if opts.schedule == "polynomial":
            for name, w in weights.items():
                masks.setdefault(name, (w.detach() != 0) | True)
            set_masks(gm, masks)
            set_schedule(gm, Schedule(opts.target, 0, 0.0, opts.scope, opts.block))
            return PassResult(
                True,
                {
                    "summary": f"{len(chosen)} layers to reach sparsity {opts.target:g} over the "
                    "next training",
                    "schedule": "polynomial",
                    "layers": chosen,
                    "skipped": skipped,
                },
            )
        new = magnitude_masks(
            weights,
            sparsity=opts.target if opts.threshold is None else None,
            threshold=opts.threshold,
            scope=opts.scope,
            block=opts.block,
        )
        for name, mask in new.items():
            old = masks.get(name)
            masks[name] = mask if old is None else (mask & old)
            weights[name].data.mul_(masks[name].to(weights[name].dtype))
        set_masks(gm, masks)
        report = summary(gm)
        zeroed = sum(int((~new[n]).sum()) for n in new)
        storage = {n: storage_bytes(masks[n], 1) for n in new}
        dense_fp32 = sum(w.numel() * 4 for w in weights.values())
        int8_sparse = sum(min(s["bitmap"], s["relative"], s["dense"]) for s in storage.values())
        report.update(
            {
                "summary": f"zeroed {zeroed:,} weights in {len(chosen)} layers, sparsity "
                f"{report['sparsity']:.3f}; {len(skipped)} kept dense",
                "skipped": skipped,
                "storage_int8": storage,
                "sparse_layers_fp32_dense_bytes": dense_fp32,
                "sparse_layers_int8_sparse_bytes": int8_sparse,
            }
        )
        log.info("sparsify: %s", report["summary"])
        return PassResult(zeroed > 0, report)
