"""Training and held-out batches for the distillation loop."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from graphopt.data import iter_batches, split_batch
from graphopt.errors import DataError

if TYPE_CHECKING:
    from graphopt.passes.distill.loop import DistillOptions

log = logging.getLogger(__name__)


class Batches:
    """Training and held-out batches. In-memory data (a list or tuple of batches) is pooled
    into samples and reshuffled each epoch; other iterables are used batch by batch, every
    ``round(1/holdout)``-th batch held out."""

    def __init__(
        self, data: Any, opts: DistillOptions, gen: torch.Generator, world: int, rank: int
    ):
        if data is None:
            raise DataError(
                "distill needs training batches: pass data=batches to Pipeline.run / compress "
                "(inputs or (inputs, labels)), or --data NAME on the command line"
            )
        self.world, self.rank, self.gen = world, rank, gen
        self.pooled = isinstance(data, (list, tuple))
        if self.pooled:
            items = [split_batch(item) for item in data]
            if not items:
                raise DataError("distill: the data has no batches")
            n_in = {len(x) for x, _ in items}
            if len(n_in) != 1:
                raise DataError("distill: batches have different numbers of inputs")
            self.inputs = tuple(torch.cat([x[i] for x, _ in items]) for i in range(n_in.pop()))
            labelled = [y is not None for _, y in items]
            if any(labelled) and not all(labelled):
                log.warning("distill: only some batches carry labels; training without labels")
            self.labels = torch.cat([y for _, y in items]) if all(labelled) else None
            n = len(self.inputs[0])
            self.batch_size = opts.batch_size or len(items[0][0][0])
            perm = torch.randperm(n, generator=gen)
            n_hold = int(round(opts.holdout * n))
            if n - n_hold < 1:
                n_hold = 0
            self.hold_idx, self.train_idx = perm[:n_hold], perm[n_hold:]
            self.has_holdout = n_hold > 0
        else:
            if opts.batch_size is not None:
                log.warning("distill: batch-size applies to in-memory data only; ignored")
            self.data = data
            self.every = int(round(1 / opts.holdout)) if opts.holdout > 0 else 0
            count = len(data) if hasattr(data, "__len__") else sum(1 for _ in iter_batches(data))
            if count == 0:
                raise DataError("distill: the data has no batches")
            if self.every and count < self.every:
                self.every = 0
            self.has_holdout = self.every > 0
            n_train = count - (count // self.every if self.every else 0)
            self.per_rank = n_train // world
            if self.per_rank == 0:
                raise DataError(f"distill: {n_train} training batches cannot feed {world} ranks")

    @property
    def labelled(self) -> bool:
        if self.pooled:
            return self.labels is not None
        _, y = next(iter_batches(self.data))
        return y is not None

    def _take(self, idx: torch.Tensor):
        x = tuple(t[idx] for t in self.inputs)
        return x, (self.labels[idx] if self.labels is not None else None), idx

    def epoch(self) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None, Any]]:
        """This rank's batches for one epoch: ``(inputs, labels, sample_index_or_None)``."""
        if self.pooled:
            order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.gen)]
            per = len(order) // self.world
            mine = order[self.rank :: self.world][:per] if self.world > 1 else order
            return [self._take(idx) for idx in mine.split(self.batch_size)]
        out = []
        j = 0
        for i, (x, y) in enumerate(iter_batches(self.data)):
            if self.every and i % self.every == self.every - 1:
                continue
            if j % self.world == self.rank and len(out) < self.per_rank:
                out.append((x, y, None))
            j += 1
        return out

    def holdout(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None, Any]]:
        if not self.has_holdout:
            return
        if self.pooled:
            for idx in self.hold_idx.split(max(self.batch_size, 256)):
                yield self._take(idx)
            return
        for i, (x, y) in enumerate(iter_batches(self.data)):
            if i % self.every == self.every - 1:
                yield x, y, None
