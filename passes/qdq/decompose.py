"""Attention spelled out so that ``qdq`` can quantize its matrix products.

Two exact rewrites (equal up to float32 rounding), run by ``qdq`` before it quantizes:

- **torch's transformer leaves**: fx keeps ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``
  and ``nn.MultiheadAttention`` opaque (they are ``torch.nn`` modules), so nothing inside them
  could be quantized. Each such call (eval mode, no masks, the same attention configuration as
  ``F.multi_head_attention_forward`` without ``bias_k``/``add_zero_attn``) is inlined as plain
  ops: the packed ``in_proj`` becomes three ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``;
  the ``1/sqrt(d)`` of the scores is folded into ``q_proj``, so each of q, k and v gets its own
  activation scale), then per head ``softmax(q kᵀ) v`` as two ``torch.matmul`` and a softmax, then
  ``out_proj``; the encoder layer keeps its LayerNorms, activation and residual adds (post- or
  pre-norm), with their original parameters and module paths (``enc.layers.0.self_attn.q_proj``).
- **``F.scaled_dot_product_attention``** (Hugging Face models through the export front end):
  ``softmax(q kᵀ · scale + mask) v`` as ``torch.matmul``, a multiplication by the scale, the
  float mask added (a boolean mask: ``-inf`` where it is False, as SDPA does), softmax and
  ``torch.matmul``.

The two matrix products then are ``matmul`` units (ORT: QLinearMatMul) and the projections
``linear`` units (ORT: MatMulIntegerToFloat + Add). ``qdq(activations=dynamic)`` runs the same
rewrite: the projections become dynamic int8 Linears and, with ``matmul=dynamic``, the two
products ``graphopt::dynamic_matmul`` (ORT: DynamicQuantizeMatMul). A call the rewrite cannot
express (masks, dropout in training mode, causal flags, ``need_weights`` read, a user-named
leaf) is left alone, with the reason in the report.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import node_meta

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_TORCH_LEAVES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _plain_linear(layer: nn.Linear) -> nn.Linear:
    """``layer`` as an ``nn.Linear`` proper (``out_proj`` is a subclass), same parameters."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.weight = layer.weight
    out.bias = layer.bias
    return out


def _slice_linear(w: torch.Tensor, b: torch.Tensor | None, scale: float = 1.0) -> nn.Linear:
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        out.weight.copy_(w * scale)
        if b is not None:
            out.bias.copy_(b * scale)
    return out


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (no masks, no attention weights) as traceable ops."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, self.heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first = mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        b = b.detach() if b is not None else None
        scale = 1.0 / math.sqrt(self.head_dim)
        parts = [
            (w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
            for i in range(3)
        ]
        self.q_proj = _slice_linear(*parts[0], scale)
        self.k_proj = _slice_linear(*parts[1])
        self.v_proj = _slice_linear(*parts[2])
        self.out_proj = _plain_linear(mha.out_proj)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:  # [T, B, E] -> [B, T, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        hd = (self.heads, self.head_dim)
        q = self.q_proj(query).unflatten(-1, hd).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(key).unflatten(-1, hd).permute(0, 2, 3, 1)  # [B, H, d, S]
        v = self.v_proj(value).unflatten(-1, hd).transpose(1, 2)  # [B, H, S, d]
        p = torch.softmax(torch.matmul(q, k), dim=-1)
        y = self.out_proj(torch.matmul(p, v).transpose(1, 2).flatten(2))
        return y if self.batch_first else y.transpose(0, 1)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (eval, no masks) as traceable ops."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = Attention(layer.self_attn)
        self.linear1, self.linear2 = _plain_linear(layer.linear1), _plain_linear(layer.linear2)
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.norm_first = layer.norm_first
        self.act = layer.activation  # a module (registered as one) or a function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            y = self.norm1(x)
            x = x + self.self_attn(y, y, y)
            return x + self.linear2(self.act(self.linear1(self.norm2(x))))
        x = self.norm1(x + self.self_attn(x, x, x))
        return self.norm2(x + self.linear2(self.act(self.linear1(x))))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (eval, no masks) as traceable ops."""

    def __init__(self, enc: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(layer) for layer in enc.layers)
        self.norm = enc.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) if self.norm is not None else x


# -- refusals -------------------------------------------------------------------------------------
def _extra_args(node: fx.Node, names: tuple[str, ...], used: int) -> str:
    """Why the call passes something the plain-op form does not compute ('' if nothing)."""
    values = dict(zip(names, node.args[used:]))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    unknown = set(node.kwargs) - set(names)
    if unknown:
        return f"called with {', '.join(sorted(unknown))}"
    for name, v in values.items():
        if name in ("need_weights", "average_attn_weights"):
            continue
        if v is not None and v is not False:
            return f"called with {name}"
    return ""


def _mha_check(mha: nn.MultiheadAttention) -> str:
    if mha.training:
        return "in training mode (dropout)"
    if not mha._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return ""


def check(node: fx.Node, gm: fx.GraphModule) -> str:
    """'' when the torch leaf ``node`` can be inlined, else the reason it cannot."""
    mod = gm.get_submodule(str(node.target))
    if node_meta(node).leaf:
        return "a leaf named by the user (leaf_modules)"
    if mod.training:
        return "in training mode (dropout)"
    if isinstance(mod, nn.MultiheadAttention):
        why = _extra_args(
            node,
            (
                "key_padding_mask",
                "need_weights",
                "attn_mask",
                "average_attn_weights",
                "is_causal",
            ),
            3,
        )
        if why or len(node.args) < 3:
            return why or "called without query, key and value"
        if any(
            u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0
            for u in node.users
        ):
            return "its attention weights are read"
        return _mha_check(mod)
    layers = mod.layers if isinstance(mod, nn.TransformerEncoder) else [mod]
    names = ("mask", "src_key_padding_mask", "is_causal")
    if isinstance(mod, nn.TransformerEncoderLayer):
        names = ("src_mask", "src_key_padding_mask", "is_causal")
    why = _extra_args(node, names, 1)
    if why or len(node.args) != 1:
        return why or "called without its input"
    for layer in layers:
        if type(layer) is not nn.TransformerEncoderLayer:
            return f"holds a {type(layer).__name__}"
        why = _mha_check(layer.self_attn)
        if why:
            return why
    return ""


# -- inlining -------------------------------------------------------------------------------------
def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _inline(gm: fx.GraphModule, node: fx.Node, replacement: nn.Module, args: list[Any]) -> Any:
    """Put ``replacement`` at ``node``'s module path and splice its traced graph in place of
    ``node`` (called on ``args``); returns what stands for ``node``'s result."""
    path = str(node.target)
    _set_submodule(gm, path, replacement)
    sub = fx.Tracer().trace(replacement)
    stem = path.replace(".", "_")
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, args))
    result: Any = None
    with gm.graph.inserting_before(node):
        for n in sub.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], env.__getitem__)
                break
            target = f"{path}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = gm.graph.create_node(
                n.op,
                target,
                fx.map_arg(n.args, env.__getitem__),
                fx.map_arg(n.kwargs, env.__getitem__),
                name=f"{stem}_{n.name}",
            )
            meta = node_meta(new)
            if n.op == "call_module":
                meta.module_path = str(target)
                meta.module_type = type(gm.get_submodule(str(target))).__name__
            else:
                stack = list((n.meta.get("nn_module_stack") or {}).values())
                inner = stack[-1][0] if stack and isinstance(stack[-1], tuple) else ""
                meta.module_path = f"{path}.{inner}" if inner else path
            meta.provenance = [path]
            env[n] = new
    return result


def _inline_leaf(gm: fx.GraphModule, node: fx.Node) -> None:
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, nn.MultiheadAttention):
        out = _inline(gm, node, Attention(mod), list(node.args[:3]))
        for u in list(node.users):
            u.replace_all_uses_with(out)
            gm.graph.erase_node(u)
    else:
        rep = Encoder(mod) if isinstance(mod, nn.TransformerEncoder) else EncoderLayer(mod)
        out = _inline(gm, node, rep, [node.args[0]])
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _sdpa_check(node: fx.Node) -> str:
    if _arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        return "attention dropout"
    if _arg(node, 5, "is_causal", False):
        return "is_causal=True"
    if _arg(node, 7, "enable_gqa", False):
        return "enable_gqa=True"
    mask = _arg(node, 3, "attn_mask")
    dtype = node_meta(mask).dtype if isinstance(mask, fx.Node) else None
    if isinstance(mask, fx.Node) and not (dtype == "bool" or (dtype or "").startswith("float")):
        return f"an attention mask of dtype {dtype}"
    if mask is not None and not isinstance(mask, fx.Node):
        return "a constant attention mask"
    q = node.args[0] if node.args else None
    shape = node_meta(q).shape if isinstance(q, fx.Node) else None
    if not shape:
        return "the query's shape is unknown"
    return ""


def _spell_sdpa(gm: fx.GraphModule, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    scale = _arg(node, 6, "scale")
    if scale is None:
        scale = 1.0 / math.sqrt(node_meta(q).shape[-1])
    path = node_meta(node).module_path
    g = gm.graph
    made = []

    def call(fn, *args):
        made.append(g.call_function(fn, args))
        return made[-1]

    with g.inserting_before(node):
        s = call(torch.matmul, q, call(torch.transpose, k, -2, -1))
        s = call(operator.mul, s, float(scale))
        if mask is not None and node_meta(mask).dtype == "bool":  # False: left out
            s = call(torch.where, mask, s, float("-inf"))
        elif mask is not None:
            s = call(operator.add, s, mask)
        o = call(torch.matmul, call(torch.softmax, s, -1), v)
    for n in made:
        node_meta(n).module_path = path
        node_meta(n).provenance = list(node_meta(node).provenance)
    node.replace_all_uses_with(o)
    g.erase_node(node)


def decompose_attention(gm: fx.GraphModule, skip) -> dict[str, list[dict[str, str]]]:
    """Inline torch's transformer leaves and spell out ``scaled_dot_product_attention`` (see
    the module docstring); ``skip(node)`` keeps a call as it is. Returns the calls rewritten and
    those kept with the reason."""
    done: list[dict[str, str]] = []
    kept: list[dict[str, str]] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not isinstance(mod, _TORCH_LEAVES) or skip(node):
                continue
            why = check(node, gm)
            row = {"node": node.name, "module": str(node.target), "op": type(mod).__name__}
            if why:
                kept.append({**row, "reason": why})
                continue
            _inline_leaf(gm, node)
            done.append(row)
        elif node.op == "call_function" and node.target in _SDPA:
            if skip(node):
                continue
            why = _sdpa_check(node)
            row = {
                "node": node.name,
                "module": node_meta(node).module_path or "",
                "op": "scaled_dot_product_attention",
            }
            if why:
                kept.append({**row, "reason": why})
                continue
            _spell_sdpa(gm, node)
            done.append(row)
    if done:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return {"decomposed": done, "kept": kept}
