"""Distillation losses, registered by name.

A loss is a function ``loss(student, teacher, **kw) -> scalar tensor``. The built-ins are
``kd`` (logits), ``ce`` (task loss against labels), and the feature losses ``mse``, ``at``
and ``relation`` (MiniLMv2's self-attention relations, for transformers).
Add your own with :func:`register_loss`; nothing registers itself on import of another module.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from graphopt.errors import OptionError

Loss = Callable[..., torch.Tensor]

LOSSES: dict[str, Loss] = {}


def register_loss(name: str) -> Callable[[Loss], Loss]:
    """Decorator: make ``fn`` available as ``name`` (e.g. ``distill(feature-loss=name)``)."""

    def deco(fn: Loss) -> Loss:
        if name in LOSSES and LOSSES[name] is not fn:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name]!r})")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        near = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise OptionError(f"unknown loss {name!r}{hint} (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


@register_loss("kd")
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation on logits (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge
    in a Neural Network").

    ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch (and any positions after
    the class dimension, which is dim 1). The ``T²`` factor keeps gradient magnitudes
    comparable across temperatures.
    """
    t = temperature
    s_log = F.log_softmax(student / t, dim=1)
    t_log = F.log_softmax(teacher / t, dim=1)
    kl = (t_log.exp() * (t_log - s_log)).sum(dim=1)
    return kl.mean() * (t * t)


@register_loss("ce")
def ce_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the labels: ``-log softmax(s)[y]``, averaged over the batch."""
    return F.cross_entropy(student, labels)


@register_loss("mse")
def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature regression (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"):
    ``mean((a(s) - t)²)`` where ``a`` is the adapter that maps student channels to the
    teacher's (applied before this loss is called)."""
    return F.mse_loss(student, teacher)


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map ``[N, C, ...]``: ``Q = vec(Σ_c |x_c|²) / ‖·‖₂``."""
    q = x.pow(2).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1)


@register_loss("at")
def at_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):
    ``mean_n ‖Q_s - Q_t‖₂²`` with ``Q`` the L2-normalised spatial attention map
    (:func:`attention_map`). Channel counts may differ: no adapter is needed."""
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention transfer needs equal spatial sizes, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    return (attention_map(student) - attention_map(teacher)).pow(2).sum(dim=1).mean()


def relation_heads(d_student: int, d_teacher: int, most: int = 12) -> int:
    """The number of relation heads: the largest ``r <= most`` dividing both widths (the
    student's may have lost attention heads, so its width differs from the teacher's)."""
    return max(r for r in range(1, most + 1) if d_student % r == 0 and d_teacher % r == 0)


def self_relation(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(X_r X_rᵀ / √d_r)`` per relation head: ``x`` is ``[B, T, D]`` (a query, key or
    value projection), split into ``heads`` slices of ``d_r = D / heads`` features; the result
    is ``[B, heads, T, T]``, rows summing to 1."""
    b, t, d = x.shape
    xr = x.reshape(b, t, heads, d // heads).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d // heads)
    return scores.log_softmax(dim=-1)


@register_loss("relation")
def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention relation distillation (Wang et al. 2021, "MiniLMv2"):
    ``mean_{b,r,i} KL(R_t[b,r,i,:] ‖ R_s[b,r,i,:])`` with ``R = softmax(X_r X_rᵀ / √d_r)`` the
    relation of a query, key or value projection with itself over the sequence
    (:func:`self_relation`). On queries/keys this transfers the attention distributions, on
    values the value relation. The widths may differ (pruned heads): both sides are split
    into the same number of relation heads (:func:`relation_heads`), so no adapter is needed.
    Features of shape ``[B, C, ...]`` (not 3-D) are read as ``[B, positions, C]``."""
    s, t = _as_sequence(student), _as_sequence(teacher)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"relation distillation needs equal batch and sequence sizes, got {tuple(s.shape)} "
            f"and {tuple(t.shape)}"
        )
    heads = relation_heads(s.shape[-1], t.shape[-1])
    log_s, log_t = self_relation(s, heads), self_relation(t, heads)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return kl.mean()


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x
    if x.dim() > 3:  # [B, C, H, W, ...] -> [B, H*W*..., C]
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"relation distillation needs [B, T, D] features, got {tuple(x.shape)}")


#: Feature losses that compare channel by channel and so need an adapter when counts differ.
NEEDS_ADAPTER = {"mse"}
