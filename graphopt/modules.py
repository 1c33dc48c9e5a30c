"""Modules that passes substitute into a graph.

:class:`SelfAttention` is what ``nn.MultiheadAttention`` becomes after head or width pruning:
the same maths and the same parameter names (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``), but the model width ``E_in``, the output width
``E_out`` and the number of heads ``H`` (each of width ``d``) are independent::

    [q, k, v] = x W_inᵀ + b_in            W_in: [3·H·d, E_in]
    o_h = softmax(q_h k_hᵀ / √d) v_h       per head h
    y = concat_h(o_h) W_outᵀ + b_out      W_out: [E_out, H·d]

:func:`window_attention` is what torchvision's Swin ``shifted_window_attention`` becomes after
head or width pruning: the same windowed attention (optional cyclic shift and its mask, the
relative position bias per head, V2's cosine attention with a per-head logit scale), but the
head width ``d`` is an argument instead of ``C // num_heads``, so heads and the model width
``C`` are pruned independently.
"""

from __future__ import annotations

import math

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


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
    head_dim: int = 0,
) -> torch.Tensor:
    """Shifted-window self-attention over ``x: [B, H, W, C]`` with ``num_heads`` heads of
    ``head_dim`` (``C // num_heads`` when 0), in windows of ``window_size``: pad H and W to
    whole windows, roll by ``-shift_size``, attend within each window (scores plus
    ``relative_position_bias: [1, heads, N, N]``, plus -100 between tokens from different
    regions of a shifted window), project, undo the roll and the padding."""
    b, h, w, c = x.shape
    wh, ww = window_size
    d = head_dim or c // num_heads
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    ph, pw = x.shape[1], x.shape[2]
    sh = 0 if wh >= ph else shift_size[0]
    sw = 0 if ww >= pw else shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, n = ph // wh, pw // ww, wh * ww
    windows = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
    if logit_scale is not None and qkv_bias is not None:
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat(
            [qkv_bias[:third], torch.zeros_like(qkv_bias[third : 2 * third]), qkv_bias[2 * third :]]
        )
    qkv = F.linear(windows, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(windows.shape[0], n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * d**-0.5) @ k.transpose(-2, -1)
    scores = scores + relative_position_bias
    if sh or sw:
        region = x.new_zeros((ph, pw))
        for i, rows in enumerate(((0, ph - wh), (ph - wh, ph - sh), (ph - sh, ph))):
            for j, cols in enumerate(((0, pw - ww), (pw - ww, pw - sw), (pw - sw, pw))):
                region[rows[0] : rows[1], cols[0] : cols[1]] = 3 * i + j
        region = region.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, n)
        mask = (region.unsqueeze(1) - region.unsqueeze(2)).ne(0).to(scores.dtype) * -100.0
        scores = scores.view(b, nh * nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, num_heads, n, n)
    attn = F.dropout(F.softmax(scores, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(windows.shape[0], n, num_heads * d)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    c_out = out.shape[-1]
    out = out.view(b, nh, nw, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()
