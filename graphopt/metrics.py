"""Numeric comparison of model outputs: the exactness check and drift metrics.

For outputs ``a`` (after) and ``b`` (before), ``max_abs = max|a - b|``, ``rel = max_abs /
max|b|``, ``cosine = <a, b> / (|a| |b|)`` over all elements, and ``top1`` the fraction of rows
whose arg-max agrees (for a 2-D ``[batch, classes]`` first output).
"""

from __future__ import annotations

from typing import Any

import torch


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if hasattr(out, "_fields"):  # namedtuple
        return [t for o in out for t in flatten_outputs(o)]
    return []


def drift(after: Any, before: Any) -> dict[str, float]:
    """Drift metrics of ``after`` against ``before`` (first tensor output for cosine/top-1)."""
    a_all, b_all = flatten_outputs(after), flatten_outputs(before)
    out: dict[str, float] = {}
    if not a_all or len(a_all) != len(b_all):
        return out
    max_abs = 0.0
    rel = 0.0
    for a, b in zip(a_all, b_all):
        if a.shape != b.shape:
            return {"shape_mismatch": 1.0}
        d = (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0
        scale = b.detach().double().abs().max().item() if b.numel() else 0.0
        max_abs = max(max_abs, d)
        rel = max(rel, d / scale if scale > 0 else d)
    out["max_abs"] = max_abs
    out["rel"] = rel
    a, b = a_all[0].detach().double().flatten(), b_all[0].detach().double().flatten()
    denom = a.norm() * b.norm()
    out["cosine"] = float((a @ b) / denom) if denom > 0 else float(torch.equal(a, b))
    a2, b2 = a_all[0], b_all[0]
    if a2.dim() == 2 and a2.shape[1] > 1:
        out["top1"] = float((a2.argmax(1) == b2.argmax(1)).double().mean())
    return out


def within(after: Any, before: Any, rtol: float, atol: float) -> bool:
    """``max|a-b| <= atol + rtol * max|b|`` for every output tensor."""
    a_all, b_all = flatten_outputs(after), flatten_outputs(before)
    if len(a_all) != len(b_all):
        return False
    for a, b in zip(a_all, b_all):
        if a.shape != b.shape:
            return False
        if a.numel() == 0:
            continue
        if a.dtype.is_floating_point:
            d = (a.double() - b.double()).abs().max().item()
            if not d <= atol + rtol * b.double().abs().max().item():
                return False
        elif not torch.equal(a, b):
            return False
    return True
