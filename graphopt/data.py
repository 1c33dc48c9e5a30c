"""Batches as passes see them.

``data`` is any re-iterable (a list, a DataLoader) whose items are a tensor, a tuple of input
tensors, or an ``(inputs, labels)`` pair whose labels are a 1-D integer tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from .errors import DataError

log = logging.getLogger(__name__)


def prepare(data: Any) -> Any:
    """``data`` ready to be read several times: a one-shot iterator (a generator) is read into a
    list once; no batches, or a batch with no samples, is a :class:`DataError`."""
    if data is None:
        return None
    try:
        it = iter(data)
    except TypeError:
        raise DataError(f"data must be re-iterable batches, got {type(data).__name__}") from None
    if it is data:
        data = list(it)
        log.info("data: read %d batches from a one-shot iterator into memory", len(data))
    count = 0
    for i, (inputs, _) in enumerate(iter_batches(data)):
        if any(t.dim() and t.shape[0] == 0 for t in inputs):
            raise DataError(f"data: batch {i} holds no samples (its first dimension is 0)")
        count += 1
        if count >= 2 and not isinstance(data, (list, tuple)):
            break  # a DataLoader: checked the first batches without reading it all
    if count == 0:
        raise DataError("data holds no batches: give at least one batch of inputs")
    return data


def split_batch(item: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``(inputs_tuple, labels_or_None)`` of one batch."""
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, dict):
        raise DataError("dict batches are not supported; give (inputs, labels) tuples")
    if isinstance(item, (list, tuple)) and item:
        if (
            len(item) == 2
            and isinstance(item[1], torch.Tensor)
            and item[1].dim() == 1
            and not item[1].is_floating_point()
        ):
            inputs = item[0]
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            return inputs, item[1]
        if all(isinstance(t, torch.Tensor) for t in item):
            return tuple(item), None
    raise DataError(
        f"a batch must be a tensor, a tuple of tensors or (inputs, labels); got {type(item).__name__}"
    )


def iter_batches(data: Any) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
    if data is None:
        raise DataError("this pass needs data: pass data=batches (CLI: --data NAME)")
    try:
        it = iter(data)
    except TypeError:
        raise DataError(f"data must be re-iterable batches, got {type(data).__name__}") from None
    for item in it:
        yield split_batch(item)


def first_batch(data: Any) -> tuple[torch.Tensor, ...] | None:
    if data is None:
        return None
    for inputs, _ in iter_batches(data):
        return inputs
    return None


def probe_inputs(
    example: tuple[torch.Tensor, ...], data: Any = None, n_data: int = 3, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """Inputs to compare two implementations of one model on: the example batch, up to
    ``n_data`` batches of ``data``, the example negated, and two random batches of the
    example's shapes and dtypes (normal with the example's mean and spread; integers in its
    range; random booleans). One batch cannot tell a branch frozen on its values apart from
    the real control flow; inputs of other signs and spreads can."""
    probes = [tuple(example)]
    if data is not None:
        for i, (inputs, _) in enumerate(iter_batches(data)):
            if i >= n_data:
                break
            probes.append(tuple(inputs))
    if all(t.is_floating_point() for t in example):
        probes.append(tuple(-t for t in example))
    gen = torch.Generator().manual_seed(seed)
    for scale in (1.0, 3.0):
        probes.append(tuple(_random_like(t, scale, gen) for t in example))
    return probes


def _random_like(t: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.randint(0, 2, t.shape, generator=gen).bool()
    if not t.is_floating_point():
        low, high = (int(t.min()), int(t.max()) + 1) if t.numel() else (0, 2)
        return torch.randint(low, high, t.shape, generator=gen, dtype=t.dtype)
    f = t.float()
    spread = float(f.std()) if t.numel() > 1 else 1.0
    noise = torch.randn(t.shape, generator=gen) * (scale * (spread or 1.0)) + float(f.mean())
    return noise.to(t.dtype)
