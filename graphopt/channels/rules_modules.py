"""Channel rules for ``call_module`` nodes: activations, pools, conv / conv-transpose (plain,
grouped, depthwise), linear, the norms (batch, instance, group, layer), PReLU, embedding and
self-attention. A layer with weights states its parameters as members: the columns it reads
(``"in"``), the rows it produces (``"out"``) and the per-channel vectors (``"norm"``)."""

from __future__ import annotations

import sys

import numpy as np
import torch.fx as fx
import torch.nn as nn

from graphopt.graph import Graph, node_meta
from graphopt.modules import SelfAttention
from graphopt.optypes import BATCHNORM, CONV, CONV_T, INSTANCENORM, POOL

from .coupling import Coupling
from .records import Rewrite

_UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.CELU,
)
_POOL_MODULES = POOL


def _unary_module_types() -> tuple[type, ...]:
    """With torchvision's ``StochasticDepth`` when torchvision is loaded (see rules_calls)."""
    ops = sys.modules.get("torchvision.ops")
    extra = getattr(ops, "StochasticDepth", None) if ops is not None else None
    return _UNARY_MODULES + ((extra,) if extra is not None else ())


class ModuleRules(Coupling):
    """The ``call_module`` rules (a mixin of :class:`~.analysis.ChannelAnalysis`; flatten is
    delegated to its shape rules)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self._unary_modules = _unary_module_types()

    def _visit_module(self, node: fx.Node, mod: nn.Module) -> bool:
        path = str(node.target)
        if node_meta(node).leaf:
            self._lock_all(node, f"leaf module {path!r}")
            return True
        # a module called at several places states its members at each call site; the
        # later ones are coupled to the first (see Coupling.member): one shared unit
        x = node.args[0] if node.args else None
        if isinstance(mod, (nn.MultiheadAttention, SelfAttention)):
            return self._attention(node, mod, path)
        if not isinstance(x, fx.Node) or len(node.args) != 1 or node.kwargs:
            if not isinstance(mod, CONV + CONV_T + (nn.Linear,)) or node.kwargs:
                return False
        shape = self._shape(x)
        if isinstance(mod, self._unary_modules):
            return self.elementwise(node, [x])
        if isinstance(mod, nn.Softmax):
            dim = mod.dim if mod.dim is not None else -1
            self.elementwise(node, [x])
            self.lock(self.space_at(node, dim % len(shape)), f"{path}: softmax over dim {dim}")
            return True
        if isinstance(mod, nn.PReLU):
            self.elementwise(node, [x])
            if mod.num_parameters > 1:
                s = self.space_at(node, 1)
                self.member(path, "weight", 0, s, np.arange(s.size), "norm")
            return True
        if isinstance(mod, _POOL_MODULES):
            self.passthrough_dims(node, x, {0: 0, 1: 1})
            return True
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, CONV):
            return self._conv(
                node, x, path, mod.weight.shape, mod.groups, mod.bias is not None, transpose=False
            )
        if isinstance(mod, CONV_T):
            return self._conv(
                node, x, path, mod.weight.shape, mod.groups, mod.bias is not None, transpose=True
            )
        if isinstance(mod, nn.Linear):
            return self._linear(node, x, path, mod.bias is not None)
        if isinstance(mod, BATCHNORM + INSTANCENORM):
            self.elementwise(node, [x])
            s = self.space_at(node, 1)
            if s is None or len(s.dims) != 1:
                return False
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    self.member(path, p, 0, s, np.arange(s.size), "norm")
            return True
        if isinstance(mod, nn.GroupNorm):
            return self._group_norm(node, x, mod, path)
        if isinstance(mod, nn.LayerNorm):
            return self._layer_norm(node, x, mod, path)
        if isinstance(mod, nn.Embedding):
            out = self.spaces_of(node)
            self.lock_node(x, f"{path}: embedding indices")
            for s in out[:-1]:
                self.lock(s, f"{path}: index dims")
            s = out[-1]
            self.member(path, "weight", 1, s, np.arange(s.size), "out")
            return True
        return False

    def _group_norm(self, node: fx.Node, x: fx.Node, mod: nn.GroupNorm, path: str) -> bool:
        """Channel ``c`` is coupled with the same position in every group (groups stay)."""
        self.elementwise(node, [x])
        s = self.space_at(node, 1)
        if s is None or len(s.dims) != 1:
            return False
        per = s.size // mod.num_groups
        idx = np.arange(s.size)
        self.couple(s.base + idx, s.base + idx % per)  # same position in every group
        for p in ("weight", "bias"):
            if getattr(mod, p, None) is not None:
                self.member(path, p, 0, s, idx, "norm")
        self.stat_spaces.add(s.id)
        return True

    def _layer_norm(self, node: fx.Node, x: fx.Node, mod: nn.LayerNorm, path: str) -> bool:
        """Only a LayerNorm over the last dim is prunable (its width is a statistics space)."""
        shape = self._shape(x)
        self.elementwise(node, [x])
        nd = len(mod.normalized_shape)
        last = self.space_at(node, len(shape) - 1)
        for d in range(len(shape) - nd, len(shape) - 1):
            self.lock(self.space_at(node, d), f"{path}: layer norm over several dims")
        if nd != 1 or last is None or len(last.dims) != 1:
            self.lock(last, f"{path}: layer norm layout")
            return True
        self.stat_spaces.add(last.id)
        for p in ("weight", "bias"):
            if getattr(mod, p, None) is not None:
                self.member(path, p, 0, last, np.arange(last.size), "norm")
        return True

    def _attention(self, node: fx.Node, mod: nn.Module, path: str) -> bool:
        """Self-attention (``nn.MultiheadAttention`` or :class:`SelfAttention`): the input width
        is consumed by ``in_proj_weight``'s columns, the output width produced by
        ``out_proj``'s rows, and a virtual per-head space (rows of q, k and v, columns of
        ``out_proj``) is coupled head-wise, so whole heads are removed.

        ``nn.MultiheadAttention`` ties ``head_dim = embed_dim / num_heads`` to the residual
        width, so it cannot hold fewer heads of the same width: the surgery replaces a pruned
        one by :class:`~graphopt.modules.SelfAttention` (same maths and parameter names, free
        widths). Traced by ``torch.export`` it arrives already as graph-level ops
        (``aten.linear`` on ``in_proj_weight``, views to ``[T, B·H, D]``, SDPA), which the
        attention rules (:mod:`.rules_attention`) prune in place."""
        args = list(node.args)
        kw = dict(node.kwargs)
        x = args[0] if args else kw.get("query")
        others = args[1:3] + [kw.get("key"), kw.get("value")]
        if not isinstance(x, fx.Node) or any(o is not None and o is not x for o in others):
            return False  # cross-attention: keep it whole
        if (
            kw.get("need_weights", True) is not False
            or kw.get("key_padding_mask") is not None
            or len(args) > 3
        ):
            return False
        if kw.get("attn_mask") is not None:
            return False
        if isinstance(mod, nn.MultiheadAttention) and (
            not mod._qkv_same_embed_dim
            or mod.bias_k is not None
            or mod.add_zero_attn
            or mod.dropout
        ):
            return False
        head_dim = mod.head_dim
        shape = self._shape(x)
        if shape is None or len(shape) != 3:
            return False
        batch_dim = 0 if mod.batch_first else 1
        self.passthrough_dims(node, x, {batch_dim: batch_dim}, consumed=(2,), produced=(2,))
        for d in (0, 1):
            if d != batch_dim:
                self.lock(self.space_at(x, d), f"{path}: attention mixes tokens")
        in_s, out_s = self.space_at(x, 2), self.space_at(node, 2)
        if in_s is None or out_s is None or len(in_s.dims) != 1 or len(out_s.dims) != 1:
            self._lock_all(node, f"{path}: attention on a joint layout")
            return True
        inner = mod.in_proj_weight.shape[0] // 3
        heads = self._new_space(f"{node.name}#heads", 0, (0,), (inner,), 0)
        self.head_spaces.add(heads.id)
        j = np.arange(inner)
        self.couple(heads.base + j, heads.base + (j // head_dim) * head_dim)
        self.member(path, "in_proj_weight", 1, in_s, np.arange(in_s.size), "in")
        self.member(path, "in_proj_weight", 0, heads, np.tile(j, 3), "out")
        if mod.in_proj_bias is not None:
            self.member(path, "in_proj_bias", 0, heads, np.tile(j, 3), "out")
        self.member(f"{path}.out_proj", "weight", 1, heads, j, "in")
        self.member(f"{path}.out_proj", "weight", 0, out_s, np.arange(out_s.size), "out")
        if mod.out_proj.bias is not None:
            self.member(f"{path}.out_proj", "bias", 0, out_s, np.arange(out_s.size), "out")
        self.rewrites.append(Rewrite(node.name, "attention", {"path": path, "head_dim": head_dim}))
        return True

    def _conv(self, node, x, path, wshape, groups, has_bias, transpose) -> bool:
        in_s = self.space_at(x, 1)
        out_s = self.space_at(node, 1)
        if in_s is None or out_s is None or len(in_s.dims) != 1 or len(out_s.dims) != 1:
            self._lock_all(node, f"{path}: conv on a joint layout")
            return True
        cin, cout = in_s.size, out_s.size
        self.passthrough_dims(node, x, {0: 0}, consumed=(1,), produced=(1,))
        in_g, out_g = cin // groups, cout // groups
        w_in_dim, w_out_dim = (0, 1) if transpose else (1, 0)
        if groups == 1:
            self.member(path, "weight", w_in_dim, in_s, np.arange(cin), "in")
            self.member(
                path, "weight", w_out_dim, out_s, np.arange(cout if not transpose else out_g), "out"
            )
        elif in_g == 1 and not transpose:
            # depthwise-like: input channel j feeds exactly output group j (out_g channels)
            j = np.arange(cout) // out_g
            self.couple(in_s.base + j, out_s.base + np.arange(cout))
            self.member(path, "weight", 0, out_s, np.arange(cout), "out")
            self.rewrites.append(Rewrite(node.name, "depthwise", {"path": path}))
        else:
            # grouped: remove the same in-group positions from every group (groups stay)
            ci = np.arange(cin)
            self.couple(in_s.base + ci, in_s.base + ci % in_g)
            co = np.arange(cout)
            self.couple(out_s.base + co, out_s.base + co % out_g)
            if transpose:
                self.member(path, "weight", 0, in_s, np.arange(cin), "in")
                self.member(path, "weight", 1, out_s, np.arange(out_g), "out")
            else:
                self.member(path, "weight", 1, in_s, np.arange(in_g), "in")
                self.member(path, "weight", 0, out_s, np.arange(cout), "out")
        if has_bias:
            self.member(path, "bias", 0, out_s, np.arange(cout), "out")
        return True

    def _linear(self, node, x, path, has_bias) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        in_s = self.space_at(x, nd - 1)
        out_spaces = self.spaces_of(node)
        out_s = out_spaces[-1] if out_spaces else None
        if in_s is None or out_s is None or len(in_s.dims) != 1 or len(out_s.dims) != 1:
            self._lock_all(node, f"{path}: linear on a joint layout")
            return True
        self.passthrough_dims(
            node, x, {d: d for d in range(nd - 1)}, consumed=(nd - 1,), produced=(nd - 1,)
        )
        self.member(path, "weight", 1, in_s, np.arange(in_s.size), "in")
        self.member(path, "weight", 0, out_s, np.arange(out_s.size), "out")
        if has_bias:
            self.member(path, "bias", 0, out_s, np.arange(out_s.size), "out")
        return True
