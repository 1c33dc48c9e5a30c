"""Modules that passes substitute into a graph.

:class:`SelfAttention` is what ``nn.MultiheadAttention`` becomes after head or width pruning:
the same maths and the same parameter names (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``), but the model width ``E_in``, the output width
``E_out`` and the number of heads ``H`` (each of width ``d``) are independent::

    [q, k, v] = x W_inᵀ + b_in            W_in: [3·H·d, E_in]
    o_h = softmax(q_h k_hᵀ / √d) v_h       per head h
    y = concat_h(o_h) W_outᵀ + b_out      W_out: [E_out, H·d]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    """Multi-head self-attention with free widths (see the module docstring)."""

    def __init__(
        self,
        embed_in: int,
        embed_out: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        batch_first: bool = False,
    ):
        super().__init__()
        self.embed_in, self.embed_out = embed_in, embed_out
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first = batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_in))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_out, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, head_dim: int) -> SelfAttention:
        """Wrap the (possibly sliced) parameters of ``mha``; ``head_dim`` is its original head width."""
        inner = mha.in_proj_weight.shape[0] // 3
        new = cls(
            mha.in_proj_weight.shape[1],
            mha.out_proj.weight.shape[0],
            inner // head_dim,
            head_dim,
            mha.in_proj_bias is not None,
            mha.batch_first,
        )
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj.weight = mha.out_proj.weight
        new.out_proj.bias = mha.out_proj.bias
        return new

    def forward(
        self,
        query,
        key=None,
        value=None,
        need_weights: bool = False,
        attn_mask=None,
        key_padding_mask=None,
    ):
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError(
                "pruned SelfAttention supports need_weights=False without key_padding_mask"
            )
        x = query if self.batch_first else query.transpose(0, 1)
        n, length = x.shape[0], x.shape[1]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        o = o.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim)
        y = self.out_proj(o)
        return (y if self.batch_first else y.transpose(0, 1)), None
