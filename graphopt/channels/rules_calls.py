"""Channel rules for ``call_function`` and ``call_method`` nodes: elementwise unary and binary
ops (broadcasting), pools, softmax, functional layer norm and linear, ``addmm`` on parameters
(Hugging Face's ``Conv1D``), and the dispatch of the shape ops (flatten,
reshape/view/unflatten, transpose/permute, cat, split/chunk, getitem, select, reductions,
squeeze/unsqueeze, expand) and the attention ops (scaled dot-product
attention, matmul, repeat_interleave) to the shape and attention rules."""

from __future__ import annotations

import operator
import sys

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.graph import Graph
from graphopt.optypes import POOL_FUNCS

from .coupling import Coupling
from .records import Rewrite
from .rules_attention import MATMUL, REPEAT_INTERLEAVE, SDPA, SWIN_FUNCTIONS

aten = torch.ops.aten

_UNARY_FUNCS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.mish,
    F.softplus,
    F.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu_,
    torch.exp,
    torch.neg,
    torch.abs,
    torch.sqrt,
    torch.clamp,
    torch.clip,
    torch.dropout,
    operator.neg,
    torch.nn.functional.celu,
    torch.cos,
    torch.sin,
    torch.rsqrt,
}
_ATEN_UNARY = {  # elementwise ATen ops the export front end leaves as they are
    "to.dtype",
    "to.dtype_layout",
    "to.device",
    "neg.default",
    "cos.default",
    "sin.default",
    "rsqrt.default",
    "pow.Tensor_Scalar",
}
_UNARY_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "exp",
    "neg",
    "abs",
    "sqrt",
    "clamp",
    "clamp_",
    "detach",
    "to",
    "type_as",
    "sigmoid_",
    "hardtanh_",
}
_BINARY_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_"}
_POW = {torch.pow, operator.pow}
"""Elementwise in their base when the exponent is a number (GPT-2's tanh GELU: ``x ** 3``)."""
_POOL_FUNCS = POOL_FUNCS
_CONV_FUNCS = {  # op -> transposed; both take (x, weight, bias, ..., groups at position 6)
    aten.conv1d.default: False,
    aten.conv2d.default: False,
    aten.conv3d.default: False,
    aten.conv_transpose1d.default: True,
    aten.conv_transpose2d.input: True,
    aten.conv_transpose3d.input: True,
}


def _stochastic_depth_funcs() -> set:
    """torchvision's ``stochastic_depth`` when torchvision is loaded (a model calling it has
    imported it; graphopt does not pay torchvision's import otherwise)."""
    ops = sys.modules.get("torchvision.ops")
    fn = getattr(ops, "stochastic_depth", None) if ops is not None else None
    return {fn} if fn is not None else set()


def _start_end(node: fx.Node) -> tuple[int, int]:
    """``start_dim`` and ``end_dim`` of a ``flatten`` call (function or method)."""
    args = node.args
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


def _dims_arg(args: tuple) -> tuple | list:
    """The shape / dims of ``x.view(*shape)`` or ``x.view(shape)`` (also reshape, permute)."""
    return args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]


class CallRules(Coupling):
    """The ``call_function`` / ``call_method`` rules (a mixin of
    :class:`~.analysis.ChannelAnalysis`; shape ops are delegated to its shape rules)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        aten_unary = {getattr(getattr(aten, n.split(".")[0]), n.split(".")[1]) for n in _ATEN_UNARY}
        self._unary_funcs = _UNARY_FUNCS | aten_unary | _stochastic_depth_funcs()

    def _visit_function(self, node: fx.Node) -> bool:
        t = node.target
        args = node.args
        swin = SWIN_FUNCTIONS.get((getattr(t, "__module__", None), getattr(t, "__name__", None)))
        if swin is not None:
            return getattr(self, swin)(node)
        if t in self._unary_funcs or (t in _POW and not isinstance(args[1], fx.Node)):
            return self.elementwise(node, [args[0]])
        if t in _BINARY_FUNCS:
            return self.elementwise(node, list(args[:2]) + [node.kwargs.get("other")])
        if t in _POOL_FUNCS:
            self.passthrough_dims(node, args[0], {0: 0, 1: 1})
            return True
        if t is torch.flatten:
            return self._flatten(node, args[0], *_start_end(node))
        if t in SDPA:
            return self._sdpa(node)
        if t in MATMUL:
            return self._matmul(node, args[0], args[1])
        if t in REPEAT_INTERLEAVE:
            return self._repeat_interleave(node)
        if t in (F.linear, aten.linear.default):
            return self._functional_linear(node)
        if t in (torch.addmm, aten.addmm.default):
            return self._addmm(node)
        if t in _CONV_FUNCS:
            return self._functional_conv(node, transpose=_CONV_FUNCS[t])
        if t in (torch.unsqueeze, aten.unsqueeze.default):
            return self._unsqueeze(node, args[0], args[1])
        if t in (torch.squeeze, aten.squeeze.dim, aten.squeeze.dims):
            return self._squeeze(node, args[0], args[1] if len(args) > 1 else None)
        if t in (torch.select, aten.select.int):
            return self._select(node, args[0], args[1])
        if t is aten.slice.Tensor:
            return self._aten_slice(node)
        if t is aten.unflatten.int:
            return self._reshape(node, args[0], args[2], kind="unflatten")
        if t is torch.cat or t is torch.concat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self._cat(node, list(args[0]), dim)
        if t in (torch.transpose, torch.swapaxes):
            return self._transpose(node, args[0], args[1], args[2])
        if t is torch.permute:
            return self._permute(node, args[0], args[1] if len(args) == 2 else args[1:])
        if t in (torch.reshape,):
            return self._reshape(node, args[0], args[1])
        if t is operator.getitem:
            return self._getitem(node)
        if t in (torch.chunk, torch.split, aten.split.Tensor, aten.split_with_sizes.default):
            return self._split(node, node.args[0], *self._split_args(node))
        if t is F.layer_norm:
            return self._functional_layer_norm(node)
        if t is torch.softmax or t is F.softmax:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", -1)
            self.elementwise(node, [args[0]])
            self.lock(
                self.space_at(node, dim % len(self._shape(node))), f"{node.name}: softmax dim"
            )
            return True
        if t is torch.mean or t is torch.sum or t is torch.amax:
            return self._reduce(
                node,
                args[0],
                args[1] if len(args) > 1 else node.kwargs.get("dim"),
                node.kwargs.get("keepdim", args[2] if len(args) > 2 else False),
                statistic=t is torch.mean,
            )
        return False

    def _visit_method(self, node: fx.Node) -> bool:
        name = node.target
        args = node.args
        if name in _UNARY_METHODS or (name == "pow" and not isinstance(args[1], fx.Node)):
            return self.elementwise(node, [args[0]])
        if name in _BINARY_METHODS:
            return self.elementwise(node, list(args[:2]))
        if name == "flatten":
            return self._flatten(node, args[0], *_start_end(node))
        if name in ("view", "reshape"):
            return self._reshape(node, args[0], _dims_arg(args))
        if name in ("matmul", "bmm", "__matmul__"):
            return self._matmul(node, args[0], args[1])
        if name == "repeat_interleave":
            return self._repeat_interleave(node)
        if name == "squeeze":
            return self._squeeze(node, args[0], args[1] if len(args) > 1 else None)
        if name == "select":
            return self._select(node, args[0], args[1])
        if name in ("transpose", "swapaxes"):
            return self._transpose(node, args[0], args[1], args[2])
        if name == "permute":
            return self._permute(node, args[0], _dims_arg(args))
        if name in ("chunk", "split"):
            return self._split(node, args[0], *self._split_args(node))
        if name in ("mean", "sum", "amax"):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self._reduce(node, args[0], dim, keep, statistic=name == "mean")
        if name == "expand":
            shape = self._shape(args[0])
            out = self._shape(node)
            if shape is None or len(shape) != len(out):
                return False
            self.elementwise(node, [args[0]])
            self._size_constraints(node, _dims_arg(args))
            self.rewrites.append(Rewrite(node.name, "reshape", {}))  # its constant sizes
            return True
        if name == "unsqueeze":
            return self._unsqueeze(node, args[0], args[1])
        if name == "unflatten":
            sizes = args[2] if len(args) > 2 else node.kwargs.get("sizes")
            if node.kwargs or not all(isinstance(v, int) for v in sizes or (None,)):
                return False  # sizes computed in the graph: not understood
            return self._reshape(node, args[0], None, kind="unflatten")
        return False  # everything else: not understood

    def _unsqueeze(self, node: fx.Node, x: fx.Node, d: int) -> bool:
        nd = len(self._shape(x))
        d = d % (nd + 1)
        self.passthrough_dims(
            node, x, {o: (o if o < d else o - 1) for o in range(nd + 1) if o != d}
        )
        return True

    def _aten_slice(self, node: fx.Node) -> bool:
        """``aten.slice(x, dim, start, end, step)``: a channel slice, like ``x[..., a:b]``."""
        x, dim, start, end, step = (*node.args, 0, None, None, 1)[:5]
        if any(isinstance(v, fx.Node) for v in (start, end, step)):
            return False
        shape = self._shape(x)
        nd = len(shape)
        dim = dim % nd
        self.passthrough_dims(
            node, x, {d: d for d in range(nd) if d != dim}, consumed=(dim,), produced=(dim,)
        )
        s_in, s_out = self.space_at(x, dim), self.space_at(node, dim)
        if step != 1:  # removing any channel would shift which ones a strided slice reads
            self.lock(s_in, f"{node.name}: strided slice of dim {dim}")
            self.lock(s_out, f"{node.name}: strided slice of dim {dim}")
            return True
        rng = range(shape[dim])[slice(start, end)]
        self.couple(s_in.base + rng.start + np.arange(len(rng)), s_out.elements())
        info = {"space": s_in.id, "start": rng.start, "n": len(rng)}
        self.rewrites.append(Rewrite(node.name, "aten_slice", info))
        return True

    def _functional_linear(self, node: fx.Node) -> bool:
        """``F.linear(x, W, b)`` with ``W`` and ``b`` read by ``get_attr`` (an exported
        ``nn.MultiheadAttention``'s ``in_proj_weight``): like ``nn.Linear``, with the rows and
        columns of ``W`` as members of the module that owns it."""
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        params = [p for p in (w, b) if p is not None]
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
            return False
        nd = len(self._shape(x))
        in_s, out_s = self.space_at(x, nd - 1), self.spaces_of(node)[-1]
        self.passthrough_dims(
            node, x, {d: d for d in range(nd - 1)}, consumed=(nd - 1,), produced=(nd - 1,)
        )
        w_out, w_in = self.spaces_of(w)
        if not (self.couple_spaces(w_out, out_s) and self.couple_spaces(w_in, in_s)):
            return False
        owner, _, param = str(w.target).rpartition(".")
        self.member(owner, param, 1, in_s, np.arange(in_s.size), "in")
        self.member(owner, param, 0, out_s, np.arange(out_s.size), "out")
        if b is not None:
            self.couple_spaces(self.spaces_of(b)[0], out_s)
            owner, _, param = str(b.target).rpartition(".")
            self.member(owner, param, 0, out_s, np.arange(out_s.size), "out")
        return True

    def _addmm(self, node: fx.Node) -> bool:
        """``addmm(b, x, W) = b + x @ W`` with ``W: [in, out]`` and ``b: [out]`` read by
        ``get_attr``: Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) as
        fx or ``torch.export`` leave it, between ``view(-1, in)`` and ``view(..., out)``. Like
        ``nn.Linear`` with the weight's dims swapped: its rows are the columns read
        (``"in"``), its columns and the bias the channels produced (``"out"``)."""
        b, x, w = (*node.args, None, None, None)[:3]
        if any(k not in ("beta", "alpha") for k in node.kwargs):
            return False
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in (b, w)):
            return False
        shapes = [self._shape(t) for t in (x, w, b, node)]
        if any(sh is None for sh in shapes) or [len(sh) for sh in shapes] != [2, 2, 1, 2]:
            return False
        (x_n, x_in), (w_in, w_out), (b_out,), (o_n, o_out) = (
            self.spaces_of(t) for t in (x, w, b, node)
        )
        if not self.couple_spaces(x_n, o_n):
            self.lock(x_n, f"{node.name}: addmm rows")
            self.lock(o_n, f"{node.name}: addmm rows")
        if not (
            self.couple_spaces(w_in, x_in)
            and self.couple_spaces(w_out, o_out)
            and self.couple_spaces(b_out, o_out)
        ):
            return False
        for p, sp, dim, kind in ((w, x_in, 0, "in"), (w, o_out, 1, "out"), (b, o_out, 0, "out")):
            owner, _, param = str(p.target).rpartition(".")
            self.member(owner, param, dim, sp, np.arange(sp.size), kind)
        return True

    def _functional_conv(self, node: fx.Node, transpose: bool) -> bool:
        """A convolution the export front end left as an ATen call (a conv-transpose, or a conv
        whose configuration differs from its module's) on ``get_attr`` parameters of one module
        (``PATH.weight``, ``PATH.bias``): the module rule with ``PATH`` as the owner. Only
        ``groups=1`` (the call's ``groups`` argument is not rewritten)."""
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or groups != 1:
            return False
        owner, _, param = str(w.target).rpartition(".")
        if param != "weight" or not (
            b is None
            or (isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{owner}.bias")
        ):
            return False
        self._conv(node, x, owner, self._shape(w), 1, b is not None, transpose)
        in_s, out_s = self.space_at(x, 1), self.space_at(node, 1)
        w_spaces = self.spaces_of(w)
        pairs = [
            (w_spaces[0], in_s if transpose else out_s),
            (w_spaces[1], out_s if transpose else in_s),
        ]
        if b is not None:
            pairs.append((self.spaces_of(b)[0], out_s))
        for ps, s in pairs:  # the parameter read's own spaces follow the channels
            if s is not None and not self.couple_spaces(ps, s):
                self.lock(s, f"{node.name}: {owner} parameter layout")
        return True

    def _functional_layer_norm(self, node: fx.Node) -> bool:
        x = node.args[0]
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        shape = self._shape(x)
        self.elementwise(node, [x])
        if isinstance(normalized, int):
            normalized = (normalized,)
        if not isinstance(normalized, (list, tuple)) or len(normalized) != 1:
            self._lock_all(node, f"{node.name}: layer_norm shape")
            return True
        last = self.space_at(node, len(shape) - 1)
        self.stat_spaces.add(last.id)
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        for p in (w, b):
            if isinstance(p, fx.Node):
                ps = self.spaces_of(p)
                if ps:
                    self.couple_spaces(ps[-1], last)
        self.rewrites.append(Rewrite(node.name, "layer_norm", {}))
        return True
