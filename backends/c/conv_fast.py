"""Packed-weight direct convolution (placeholder until the fast kernel lands)."""

from __future__ import annotations


def applicable(geo: dict) -> bool:
    return False


def emit(cg, geo, w, b, n, x, y, act):  # pragma: no cover - not applicable yet
    raise NotImplementedError
