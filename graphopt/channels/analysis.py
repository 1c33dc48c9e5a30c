"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every dimension of every tensor in the graph is an index *space*; each index of a space is an
*element*. Ops add couplings between elements (``conv -> bn -> relu -> add`` couples channel
``c`` of each tensor, a concat couples input channel ``c`` with output channel ``offset + c``,
a flatten couples output feature ``c*H*W + s`` with input channel ``c``, a channel shuffle
couples by its permutation). The connected components of that element graph are the
**units**: a unit is one "channel" that is removed everywhere at once. Units whose spaces are
touched in the same way form a **group**, ranked and pruned together.

Soundness comes from locking: an element is *locked* when its space meets a model input or
output, a leaf module, an op the analysis does not understand, or a dimension an op needs at
a fixed size (a reduced dimension, a spatial kernel input, a fresh output dimension). A lock
spreads to the whole unit, so only units every op agrees on can be removed. A unit is
*prunable* when it is unlocked and holds a producer (an output channel of a conv / linear /
embedding), so removing it saves work.

Joint spaces: a reshape that splits one dimension into several (``[N, C] -> [N, g, C/g]``)
keeps the split dims as one joint space with a row-major flat index; to keep every later
reshape valid, elements are coupled across all but the innermost split dim (removal is
"rectangular"). A reshape that merges dims couples the merged output with its outermost
input dim and locks the inner ones.

The result (:class:`ChannelAnalysis`) is cached on the Graph as the ``"channels"`` analysis and
also exposes a networkx graph of spaces for other passes.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphopt.graph import Graph, node_meta
from graphopt.modules import SelfAttention
from graphopt.optypes import BATCHNORM, CONV, CONV_T, INSTANCENORM, call_sites

log = logging.getLogger(__name__)


@dataclass
class Space:
    """A group of consecutive dims of one node output, with flat row-major indexing."""

    id: int
    node: str
    out: int  # which tensor of a tuple-returning node
    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    base: int
    inner: int  # the dim (absolute) that absorbs size changes

    @property
    def size(self) -> int:
        return int(np.prod(self.sizes)) if self.sizes else 1

    def elements(self) -> np.ndarray:
        return self.base + np.arange(self.size)


@dataclass
class Member:
    """A tensor slot that shrinks with a space: ``owner.param`` along ``dim``.

    ``index_map[k]`` is the element of ``space`` that parameter index ``k`` belongs to.
    ``kind``: ``"out"`` (produces the space), ``"in"`` (consumes it) or ``"norm"``/``"attr"``.
    """

    owner: str  # module path ("" for get_attr targets on the root)
    param: str
    dim: int
    space: int
    index_map: np.ndarray
    kind: str


@dataclass
class Rewrite:
    """A node whose arguments must be recomputed after pruning."""

    node: str
    kind: str  # "reshape", "layer_norm", "split", "group_norm"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Units that touch the same spaces; pruned with one ratio and ranked against each other."""

    id: int
    units: np.ndarray  # component labels
    spaces: tuple[int, ...]
    members: list[int]  # indices into ChannelAnalysis.members
    producers: list[str]
    stats_coupled: bool = False  # channels feed a LayerNorm/GroupNorm's statistics

    @property
    def size(self) -> int:
        return len(self.units)


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
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_POOL_FUNCS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_CONV, _CONVT, _BN, _IN = CONV, CONV_T, BATCHNORM, INSTANCENORM


def _stochastic_depth_funcs() -> set:
    try:
        from torchvision.ops import stochastic_depth

        return {stochastic_depth}
    except Exception:  # pragma: no cover - torchvision absent
        return set()


def _unary_module_types() -> tuple[type, ...]:
    extra: list[type] = []
    try:
        from torchvision.ops import StochasticDepth

        extra.append(StochasticDepth)
    except Exception:  # pragma: no cover
        pass
    return _UNARY_MODULES + tuple(extra)


def _fn_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class ChannelAnalysis:
    """Spaces, couplings, locks, units and groups of one Graph (see the module docstring)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.gm = graph.module
        self.spaces: list[Space] = []
        self.layout: dict[tuple[str, int], list[Space]] = {}
        self.members: list[Member] = []
        self.rewrites: list[Rewrite] = []
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._locks: list[tuple[np.ndarray, str]] = []
        self._n = 0
        self.lock_reasons: dict[int, str] = {}  # space id -> first reason
        self.stat_spaces: set[int] = set()  # spaces normalised by LayerNorm/GroupNorm statistics
        self.size_pairs: list[tuple[int, int, str]] = []  # spaces whose sizes must stay equal
        self._calls = call_sites(self.gm)
        self._unary_funcs = _UNARY_FUNCS | _stochastic_depth_funcs()
        self._unary_modules = _unary_module_types()
        self._build()
        self._solve()

    # -- spaces -------------------------------------------------------------------------------
    def _shape(self, node: Any, out: int = 0) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        outs = node_meta(node).outputs
        if out < len(outs):
            return outs[out].shape
        return None

    def _new_space(
        self, node: str, out: int, dims: tuple[int, ...], sizes: tuple[int, ...], inner: int
    ) -> Space:
        s = Space(len(self.spaces), node, out, dims, sizes, self._n, inner)
        self._n += s.size
        self.spaces.append(s)
        return s

    def _make_layout(
        self,
        node: fx.Node,
        out: int,
        groups: list[tuple[int, ...]] | None = None,
        inner: dict | None = None,
    ) -> list[Space]:
        """Create the spaces of one node output: ``groups`` lists joint dims; others single."""
        shape = self._shape(node, out)
        if shape is None:
            return []
        joint = {g[0]: g for g in (groups or []) if len(g) > 1}
        spaces = []
        d = 0
        while d < len(shape):
            dims = joint.get(d, (d,))
            sizes = tuple(shape[i] for i in dims)
            spaces.append(
                self._new_space(node.name, out, dims, sizes, (inner or {}).get(dims, dims[-1]))
            )
            d += len(dims)
        self.layout[(node.name, out)] = spaces
        return spaces

    def spaces_of(self, node: Any, out: int = 0) -> list[Space]:
        if not isinstance(node, fx.Node):
            return []
        key = (node.name, out)
        if key not in self.layout:
            self._make_layout(node, out)
        return self.layout[key]

    def layout_shape(self, name: str, out: int = 0) -> tuple[int, ...]:
        """The traced shape of a node output, as covered by its spaces."""
        return tuple(sz for s in self.layout.get((name, out), []) for sz in s.sizes)

    def space_at(self, node: Any, dim: int, out: int = 0) -> Space | None:
        for s in self.spaces_of(node, out):
            if dim in s.dims:
                return s
        return None

    # -- primitive facts --------------------------------------------------------------------------
    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.size:
            self._edges.append((a, b))

    def couple_spaces(self, a: Space, b: Space) -> bool:
        """Identity coupling of two spaces with the same dims structure; False if impossible."""
        if a.sizes != b.sizes:
            return False
        self.couple(a.elements(), b.elements())
        return True

    def lock(self, space: Space | None, reason: str) -> None:
        if space is None:
            return
        self._locks.append((space.elements(), reason))
        self.lock_reasons.setdefault(space.id, reason)

    def lock_node(self, node: Any, reason: str, out: int | None = None) -> None:
        if not isinstance(node, fx.Node):
            return
        outs = range(len(node_meta(node).outputs)) if out is None else [out]
        for o in outs:
            for s in self.spaces_of(node, o):
                self.lock(s, reason)

    def member(
        self, owner: str, param: str, dim: int, space: Space, index_map: np.ndarray, kind: str
    ) -> None:
        self.members.append(
            Member(owner, param, dim, space.id, np.asarray(index_map, dtype=np.int64), kind)
        )

    # -- building ------------------------------------------------------------------------------------
    def _build(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                handled = self._visit(node)
            except Exception as e:  # never crash: lock and explain
                log.debug("channel analysis: %s raised %s", node.name, e, exc_info=True)
                handled = False
                reason = f"{node.name}: analysis error {type(e).__name__}: {e}"
                self._lock_all(node, reason)
                continue
            if handled is False:
                self._lock_all(node, f"{node.name} ({_describe(self.gm, node)}) is not understood")

    def _tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, int]]:
        return [(a, i) for a in node.all_input_nodes for i in range(len(node_meta(a).outputs))]

    def _lock_all(self, node: fx.Node, reason: str) -> None:
        for a, o in self._tensor_inputs(node):
            self.lock_node(a, reason, o)
        self.lock_node(node, reason)

    def _visit(self, node: fx.Node) -> bool:
        op = node.op
        if op == "placeholder":
            self.lock_node(node, f"model input {node.name!r}")
            return True
        if op == "output":
            for a in node.all_input_nodes:
                self.lock_node(a, "model output")
            return True
        if op == "get_attr":
            return self._visit_get_attr(node)
        meta = node_meta(node)
        if not meta.outputs:
            # size(), dim(), getattr(x, "shape"), asserts: reading sizes is fine.
            if op == "call_method" and node.target in ("size", "dim"):
                return True
            if op == "call_function" and node.target in (getattr, torch._assert, operator.eq):
                return True
            if op == "call_function" and node.target is operator.getitem:
                src = node.args[0]
                return not (isinstance(src, fx.Node) and len(node_meta(src).outputs) > 1)
            if not any(node_meta(a).outputs for a in node.all_input_nodes):
                return True  # pure arithmetic on sizes
            return False
        if op == "call_module":
            return self._visit_module(node, self.gm.get_submodule(node.target))
        if op == "call_function":
            return self._visit_function(node)
        if op == "call_method":
            return self._visit_method(node)
        return False

    def _visit_get_attr(self, node: fx.Node) -> bool:
        # A parameter or buffer read directly: sliceable along any dim it is coupled on.
        for s in self.spaces_of(node):
            if len(s.dims) == 1:
                self.member(
                    _owner(node.target), _leaf(node.target), s.dims[0], s, np.arange(s.size), "attr"
                )
            else:
                self.lock(s, f"{node.target} joint dims")
        return True

    # elementwise ----------------------------------------------------------------------------------
    def elementwise(self, node: fx.Node, inputs: list[Any]) -> bool:
        """Right-aligned broadcasting: couple each non-broadcast input dim with the output dim."""
        out_shape = self._shape(node)
        if out_shape is None:
            return False
        tensors = [a for a in inputs if isinstance(a, fx.Node) and self._shape(a) is not None]
        # Layout of the output follows the first full-rank input (keeps joint spaces).
        ref = next((a for a in tensors if self._shape(a) == out_shape), None)
        if ref is not None and (node.name, 0) not in self.layout:
            groups = [s.dims for s in self.spaces_of(ref)]
            inner = {s.dims: s.inner for s in self.spaces_of(ref)}
            self._make_layout(node, 0, groups, inner)
        out_spaces = self.spaces_of(node)
        coupled_out = set()
        for a in tensors:
            shape = self._shape(a)
            offset = len(out_shape) - len(shape)
            for s in self.spaces_of(a):
                sizes_out = tuple(out_shape[d + offset] for d in s.dims)
                if all(x == 1 for x in s.sizes) and any(x != 1 for x in sizes_out):
                    continue  # broadcast: no coupling
                target = self._space_with_dims(out_spaces, tuple(d + offset for d in s.dims))
                if target is None or target.sizes != s.sizes:
                    if s.sizes != sizes_out:
                        # partial broadcast inside a joint space, or mismatched structure
                        self.lock(s, f"{node.name}: broadcast over {s.dims}")
                        continue
                    self.lock(s, f"{node.name}: layout mismatch")
                    for t in out_spaces:
                        if set(t.dims) & {d + offset for d in s.dims}:
                            self.lock(t, f"{node.name}: layout mismatch")
                    continue
                self.couple_spaces(s, target)
                coupled_out.add(target.id)
        for t in out_spaces:
            if t.id not in coupled_out:
                self.lock(t, f"{node.name}: output dims {t.dims} not from an input")
        return True

    @staticmethod
    def _space_with_dims(spaces: list[Space], dims: tuple[int, ...]) -> Space | None:
        for s in spaces:
            if s.dims == dims:
                return s
        return None

    def passthrough_dims(
        self,
        node: fx.Node,
        src: fx.Node,
        dim_map: dict[int, int],
        out: int = 0,
        src_out: int = 0,
        consumed: tuple[int, ...] = (),
        produced: tuple[int, ...] = (),
    ) -> None:
        """Couple ``src`` dim ``dim_map[o]`` with output dim ``o``; lock every other dim except
        the input dims a parameter ``consumed`` and the output dims a parameter ``produced``."""
        in_spaces = self.spaces_of(src, src_out)
        inv = {v: k for k, v in dim_map.items()}
        groups, inner = [], {}
        for s in in_spaces:
            if len(s.dims) > 1 and all(d in inv for d in s.dims):
                od = tuple(sorted(inv[d] for d in s.dims))
                if od == tuple(range(od[0], od[0] + len(od))):
                    groups.append(od)
                    inner[od] = inv[s.inner]
        if (node.name, out) not in self.layout:
            self._make_layout(node, out, groups, inner)
        out_spaces = self.spaces_of(node, out)
        coupled_out = set()
        for s in in_spaces:
            if s.dims in [(d,) for d in consumed]:
                continue
            if not all(d in inv for d in s.dims):
                self.lock(s, f"{node.name}: consumes dims {s.dims}")
                continue
            od = tuple(inv[d] for d in s.dims)
            t = self._space_with_dims(out_spaces, od)
            if t is None and len(od) > 1:
                # joint space whose dims were permuted but stay adjacent in a new order
                t = self._space_with_dims(out_spaces, tuple(sorted(od)))
                if t is not None and t.size == s.size:
                    perm = [sorted(od).index(x) for x in od]
                    idx = np.arange(s.size).reshape(s.sizes).transpose(np.argsort(perm))
                    self.couple(s.base + idx.reshape(-1), t.elements())
                    coupled_out.add(t.id)
                    continue
            if t is None or t.size != s.size:
                self.lock(s, f"{node.name}: dims {s.dims} not preserved")
                continue
            self.couple_spaces(s, t)
            coupled_out.add(t.id)
        for t in out_spaces:
            if t.id not in coupled_out and t.dims not in [(d,) for d in produced]:
                self.lock(t, f"{node.name}: fixed-size output dims {t.dims}")

    # modules ------------------------------------------------------------------------------------------
    def _visit_module(self, node: fx.Node, mod: nn.Module) -> bool:
        path = str(node.target)
        if node_meta(node).leaf:
            self._lock_all(node, f"leaf module {path!r}")
            return True
        if self._calls[path] > 1 and any(True for _ in mod.parameters(recurse=False)):
            self._lock_all(node, f"module {path!r} is called at {self._calls[path]} places")
            return True
        x = node.args[0] if node.args else None
        if isinstance(mod, (nn.MultiheadAttention, SelfAttention)):
            return self._attention(node, mod, path)
        if not isinstance(x, fx.Node) or len(node.args) != 1 or node.kwargs:
            if not isinstance(mod, _CONV + _CONVT + (nn.Linear,)) or node.kwargs:
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
        if isinstance(mod, _CONV):
            return self._conv(
                node, x, path, mod.weight.shape, mod.groups, mod.bias is not None, transpose=False
            )
        if isinstance(mod, _CONVT):
            return self._conv(
                node, x, path, mod.weight.shape, mod.groups, mod.bias is not None, transpose=True
            )
        if isinstance(mod, nn.Linear):
            return self._linear(node, x, path, mod.bias is not None)
        if isinstance(mod, _BN + _IN):
            self.elementwise(node, [x])
            s = self.space_at(node, 1)
            if s is None or len(s.dims) != 1:
                return False
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    self.member(path, p, 0, s, np.arange(s.size), "norm")
            return True
        if isinstance(mod, nn.GroupNorm):
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
        if isinstance(mod, nn.LayerNorm):
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
        if isinstance(mod, nn.Embedding):
            out = self.spaces_of(node)
            self.lock_node(x, f"{path}: embedding indices")
            for s in out[:-1]:
                self.lock(s, f"{path}: index dims")
            s = out[-1]
            self.member(path, "weight", 1, s, np.arange(s.size), "out")
            return True
        return False

    def _attention(self, node: fx.Node, mod: nn.Module, path: str) -> bool:
        """Self-attention (``nn.MultiheadAttention`` or :class:`SelfAttention`): the input width
        is consumed by ``in_proj_weight``'s columns, the output width produced by
        ``out_proj``'s rows, and a virtual per-head space (rows of q, k and v, columns of
        ``out_proj``) is coupled head-wise, so whole heads are removed."""
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
        if isinstance(mod, nn.MultiheadAttention):
            if (
                not mod._qkv_same_embed_dim
                or mod.bias_k is not None
                or mod.add_zero_attn
                or mod.dropout
            ):
                return False
            head_dim = mod.head_dim
        else:
            head_dim = mod.head_dim
        batch_first = mod.batch_first
        shape = self._shape(x)
        if shape is None or len(shape) != 3:
            return False
        batch_dim = 0 if batch_first else 1
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

    # functions ----------------------------------------------------------------------------------------
    def _visit_function(self, node: fx.Node) -> bool:
        t = node.target
        args = node.args
        if t in self._unary_funcs:
            return self.elementwise(node, [args[0]])
        if t in _BINARY_FUNCS:
            return self.elementwise(node, list(args[:2]) + [node.kwargs.get("other")])
        if t in _POOL_FUNCS:
            self.passthrough_dims(node, args[0], {0: 0, 1: 1})
            return True
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, args[0], start, end)
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
        if t in (torch.chunk, torch.split):
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
            )
        return False

    def _visit_method(self, node: fx.Node) -> bool:
        name = node.target
        args = node.args
        if name in _UNARY_METHODS:
            return self.elementwise(node, [args[0]])
        if name in _BINARY_METHODS:
            return self.elementwise(node, list(args[:2]))
        if name == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, args[0], start, end)
        if name in ("view", "reshape"):
            shape = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            return self._reshape(node, args[0], shape)
        if name in ("transpose", "swapaxes"):
            return self._transpose(node, args[0], args[1], args[2])
        if name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            return self._permute(node, args[0], dims)
        if name in ("chunk", "split"):
            return self._split(node, args[0], *self._split_args(node))
        if name in ("mean", "sum", "amax"):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self._reduce(node, args[0], dim, keep)
        if name == "expand":
            shape = self._shape(args[0])
            out = self._shape(node)
            if shape is None or len(shape) != len(out):
                return False
            return self.elementwise(node, [args[0]])
        if name == "unsqueeze":
            d = args[1] % (len(self._shape(args[0])) + 1)
            nd = len(self._shape(args[0]))
            self.passthrough_dims(
                node, args[0], {o: (o if o < d else o - 1) for o in range(nd + 1) if o != d}
            )
            return True
        if name == "squeeze":
            return False
        return False

    # shape ops --------------------------------------------------------------------------------------
    def _flatten(self, node, x, start, end) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        start, end = start % nd, end % nd
        if start == end:
            return self.elementwise(node, [x])
        dim_map = {d: d for d in range(start)}
        dim_map.update({d - (end - start): d for d in range(end + 1, nd)})
        out = self._make_layout(node, 0)
        merged = self.space_at(node, start)
        # couple the untouched dims
        for o, i in dim_map.items():
            s, t = self.space_at(x, i), self.space_at(node, o)
            if s is None or t is None or len(s.dims) != 1 or not self.couple_spaces(s, t):
                self.lock(s, f"{node.name}: flatten layout")
                self.lock(t, f"{node.name}: flatten layout")
        return self._merge(node, x, list(range(start, end + 1)), merged, out)

    def _merge(self, node, x, in_dims: list[int], merged: Space, out: list[Space]) -> bool:
        """Output dim ``merged`` is the row-major merge of ``in_dims`` of ``x``: couple it with
        the outermost non-singleton input dim and lock the inner ones."""
        shape = self._shape(x)
        sizes = [shape[d] for d in in_dims]
        spaces = [self.space_at(x, d) for d in in_dims]
        outer_i = next((i for i, s in enumerate(sizes) if s != 1), 0)
        outer = spaces[outer_i]
        if outer is None or any(len(s.dims) != 1 for s in spaces if s is not None and s.size > 1):
            # joint input spaces exactly covering the merge: flat identity
            uniq = []
            for s in spaces:
                if s is not None and s not in uniq:
                    uniq.append(s)
            if len(uniq) == 1 and uniq[0].dims == tuple(in_dims) and uniq[0].size == merged.size:
                self.couple_spaces_flat(uniq[0], merged)
                return True
            for s in uniq:
                self.lock(s, f"{node.name}: merge of joint dims")
            self.lock(merged, f"{node.name}: merge of joint dims")
            return True
        inner = int(np.prod(sizes[outer_i + 1 :])) if outer_i + 1 < len(sizes) else 1
        e = np.arange(merged.size)
        self.couple(outer.base + e // inner, merged.base + e)
        for s in spaces[outer_i + 1 :]:
            self.lock(s, f"{node.name}: inner dim of a merge")
        self.rewrites.append(Rewrite(node.name, "merge", {}))
        return True

    def couple_spaces_flat(self, a: Space, b: Space) -> None:
        self.couple(a.elements(), b.elements())

    def _reshape(self, node, x, target) -> bool:
        shape_in = self._shape(x)
        shape_out = self._shape(node)
        if shape_in is None or shape_out is None:
            return False
        groups = _reshape_groups(shape_in, shape_out)
        if groups is None:
            self._lock_all(node, f"{node.name}: reshape {shape_in} -> {shape_out} not understood")
            return True
        joint, inner = [], {}
        for gi, go in groups:
            if len(gi) == 1 and len(go) > 1:
                joint.append(tuple(go))
                inner[tuple(go)] = go[-1]
        self._make_layout(node, 0, joint, inner)
        for gi, go in groups:
            in_spaces = [self.space_at(x, d) for d in gi]
            out_spaces = [self.space_at(node, d) for d in go]
            if len(gi) == 1 and len(go) == 1:
                s, t = in_spaces[0], out_spaces[0]
                if s is None or t is None or not self.couple_spaces(s, t):
                    self.lock(s, f"{node.name}: reshape")
                    self.lock(t, f"{node.name}: reshape")
            elif len(gi) == 1:
                s, t = in_spaces[0], out_spaces[0]
                if s is None or len(s.dims) != 1 or t.size != s.size:
                    self.lock(s, f"{node.name}: reshape split")
                    self.lock(t, f"{node.name}: reshape split")
                    continue
                # split: flat identity, plus rectangular removal (couple across outer dims)
                self.couple(s.elements(), t.elements())
                inner_size = t.sizes[-1]
                e = np.arange(t.size)
                self.couple(t.base + e, t.base + e % inner_size)
            elif len(go) == 1:
                self._merge(node, x, list(gi), out_spaces[0], [])
            else:
                for s in in_spaces + out_spaces:
                    self.lock(s, f"{node.name}: many-to-many reshape")
        self._size_constraints(node, target)
        self.rewrites.append(Rewrite(node.name, "reshape", {}))
        return True

    def _size_constraints(self, node: fx.Node, target: Any) -> None:
        """A reshape whose size arguments are read from some tensor's shape requires that dim
        to keep the same size as the output dim it defines: record the pair of spaces."""
        vals = list(target) if isinstance(target, (list, tuple)) else [target]
        for d, v in enumerate(vals):
            if not isinstance(v, fx.Node):
                continue
            out = self.space_at(node, d)
            for src, k in _size_sources(v):
                sp = self.space_at(src, k % max(1, len(self._shape(src) or (1,))))
                if out is not None and sp is not None:
                    self.size_pairs.append((out.id, sp.id, node.name))

    def _transpose(self, node, x, d0, d1) -> bool:
        nd = len(self._shape(x))
        d0, d1 = d0 % nd, d1 % nd
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self._permute(node, x, perm)

    def _permute(self, node, x, dims) -> bool:
        nd = len(self._shape(x))
        dims = [int(d) % nd for d in dims]
        self.passthrough_dims(node, x, {o: i for o, i in enumerate(dims)})
        return True

    def _cat(self, node, tensors, dim) -> bool:
        out_shape = self._shape(node)
        nd = len(out_shape)
        dim = dim % nd
        self._make_layout(node, 0)
        t = self.space_at(node, dim)
        offset = 0
        for a in tensors:
            shape = self._shape(a)
            if shape is None:
                return False
            s = self.space_at(a, dim)
            if s is None or len(s.dims) != 1 or t is None:
                self.lock(s, f"{node.name}: concat of a joint layout")
                self.lock(t, f"{node.name}: concat of a joint layout")
            else:
                self.couple(s.elements(), t.base + offset + np.arange(s.size))
            for d in range(nd):
                if d == dim:
                    continue
                si, so = self.space_at(a, d), self.space_at(node, d)
                if si is None or len(si.dims) != 1 or not self.couple_spaces(si, so):
                    self.lock(si, f"{node.name}: concat layout")
                    self.lock(so, f"{node.name}: concat layout")
            offset += shape[dim]
        return True

    def _split_args(self, node) -> tuple[Any, int, str]:
        args, kw = node.args, node.kwargs
        name = _fn_name(node)
        second = (
            args[1]
            if len(args) > 1
            else kw.get("chunks", kw.get("split_size_or_sections", kw.get("split_size")))
        )
        dim = args[2] if len(args) > 2 else kw.get("dim", 0)
        return second, dim, name

    def _split(self, node, x, second, dim, name) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        dim = dim % nd
        outs = node_meta(node).outputs
        s = self.space_at(x, dim)
        if s is None or len(s.dims) != 1:
            self._lock_all(node, f"{node.name}: split of a joint layout")
            return True
        offset = 0
        for k, info in enumerate(outs):
            spaces = self._make_layout(node, k)
            t = spaces[dim] if dim < len(spaces) else None
            n = info.shape[dim]
            self.couple(s.base + offset + np.arange(n), t.elements())
            for d in range(nd):
                if d == dim:
                    continue
                si, so = self.space_at(x, d), self.space_at(node, d, k)
                if si is None or len(si.dims) != 1 or not self.couple_spaces(si, so):
                    self.lock(si, f"{node.name}: split layout")
                    self.lock(so, f"{node.name}: split layout")
            offset += n
        self.rewrites.append(Rewrite(node.name, "split", {"dim": dim}))
        return True

    def _getitem(self, node) -> bool:
        src, idx = node.args
        if isinstance(src, fx.Node) and node_meta(src).container:
            if not isinstance(idx, int) or idx >= len(node_meta(src).outputs):
                return False
            # element of a tuple-returning op (split/chunk): same spaces
            src_spaces = self.spaces_of(src, idx)
            self._make_layout(
                node, 0, [s.dims for s in src_spaces], {s.dims: s.inner for s in src_spaces}
            )
            for a, b in zip(src_spaces, self.spaces_of(node)):
                self.couple_spaces(a, b)
            return True
        shape = self._shape(src)
        if shape is None:
            return False
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(it, fx.Node) for it in items):
            return False
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        dim_map, d_in, d_out = {}, 0, 0
        sliced: list[tuple[int, int, int, int, int]] = []  # (item, dim in, dim out, start, len)
        for it in items:
            if it is Ellipsis:
                for _ in range(len(shape) - n_real):
                    dim_map[d_out] = d_in
                    d_in += 1
                    d_out += 1
                continue
            if it is None:
                d_out += 1
                continue
            if isinstance(it, slice) and it == slice(None):
                dim_map[d_out] = d_in
                d_in += 1
                d_out += 1
                continue
            if isinstance(it, int):
                self.lock(self.space_at(src, d_in), f"{node.name}: indexes dim {d_in}")
                d_in += 1
                continue
            if isinstance(it, slice):
                rng = range(shape[d_in])[it]
                if it.step not in (None, 1) or not all(
                    isinstance(v, (int, type(None))) for v in (it.start, it.stop)
                ):
                    # removing any channel would shift which ones a strided slice reads
                    self.lock(self.space_at(src, d_in), f"{node.name}: strided slice of dim {d_in}")
                else:
                    sliced.append((items.index(it), d_in, d_out, rng.start, len(rng)))
                d_in += 1
                d_out += 1
                continue
            return False
        while d_in < len(shape):
            dim_map[d_out] = d_in
            d_in += 1
            d_out += 1
        self.passthrough_dims(
            node,
            src,
            dim_map,
            consumed=tuple(x[1] for x in sliced),
            produced=tuple(x[2] for x in sliced),
        )
        for pos, di, do, start, n in sliced:
            s_in, s_out = self.space_at(src, di), self.space_at(node, do)
            if s_in is None or s_out is None or len(s_in.dims) != 1 or len(s_out.dims) != 1:
                self.lock(s_in, f"{node.name}: slice of a joint layout")
                self.lock(s_out, f"{node.name}: slice of a joint layout")
                continue
            # channel slicing: output k is input start + k; the bounds move when channels go
            self.couple(s_in.base + start + np.arange(n), s_out.elements())
            self.rewrites.append(
                Rewrite(node.name, "slice", {"pos": pos, "space": s_in.id, "start": start, "n": n})
            )
        return True

    def _reduce(self, node, x, dim, keepdim) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        if dim is None:
            self._lock_all(node, f"{node.name}: full reduction")
            return True
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        dim_map, o = {}, 0
        for d in range(nd):
            if d in dims:
                if keepdim:
                    o += 1
                continue
            dim_map[o] = d
            o += 1
        self.passthrough_dims(node, x, dim_map)
        return True

    def _functional_layer_norm(self, node) -> bool:
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

    # solving -------------------------------------------------------------------------------------
    def _solve(self) -> None:
        n = self._n
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        mat = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        self.n_units, self.labels = connected_components(mat, directed=False)
        for a_id, b_id, where in self.size_pairs:
            sa, sb = self.spaces[a_id], self.spaces[b_id]
            ua = set(np.unique(self.labels[sa.elements()]).tolist())
            ub = set(np.unique(self.labels[sb.elements()]).tolist())
            if ua != ub:
                reason = f"{where}: a shape read from {sb.node} sizes {sa.node}"
                self._locks.append((sa.elements(), reason))
                self._locks.append((sb.elements(), reason))
        locked = np.zeros(self.n_units, dtype=bool)
        self.unit_lock_reason: dict[int, str] = {}
        for elems, reason in self._locks:
            labs = np.unique(self.labels[elems])
            new = labs[~locked[labs]]
            for u in new[:1]:
                self.unit_lock_reason.setdefault(int(u), reason)
            locked[labs] = True
        self.unit_locked = locked
        self.element_space = np.zeros(n, dtype=np.int64)
        for s in self.spaces:
            self.element_space[s.base : s.base + s.size] = s.id
        produced = np.zeros(self.n_units, dtype=bool)
        for m in self.members:
            if m.kind == "out":
                sp = self.spaces[m.space]
                produced[np.unique(self.labels[sp.base + m.index_map])] = True
        self.unit_prunable = produced & ~locked
        self._groups()

    def _groups(self) -> None:
        units = np.nonzero(self.unit_prunable)[0]
        self.groups: list[Group] = []
        if len(units) == 0:
            return
        mask = self.unit_prunable[self.labels]
        elems = np.nonzero(mask)[0]
        pairs = np.unique(np.stack([self.labels[elems], self.element_space[elems]], 1), axis=0)
        by_unit: dict[int, list[int]] = defaultdict(list)
        for u, s in pairs:
            by_unit[int(u)].append(int(s))
        by_sig: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for u, ss in by_unit.items():
            by_sig[tuple(ss)].append(u)
        member_by_space: dict[int, list[int]] = defaultdict(list)
        for i, m in enumerate(self.members):
            member_by_space[m.space].append(i)
        for gid, (sig, us) in enumerate(sorted(by_sig.items(), key=lambda kv: min(kv[1]))):
            mem = [i for s in sig for i in member_by_space.get(s, [])]
            prods = sorted({self.members[i].owner for i in mem if self.members[i].kind == "out"})
            stats = any(sp in self.stat_spaces for sp in sig)
            self.groups.append(Group(gid, np.array(sorted(us)), sig, mem, prods, stats))

    # views -------------------------------------------------------------------------------------
    def space_graph(self) -> nx.Graph:
        """Spaces as nodes, an edge where two spaces share a unit (for inspection/other passes)."""
        g = nx.Graph()
        for s in self.spaces:
            g.add_node(s.id, node=s.node, dims=s.dims, size=s.size)
        for grp in self.groups:
            for a, b in zip(grp.spaces, grp.spaces[1:]):
                g.add_edge(a, b, group=grp.id)
        return g

    def locked_summary(self, limit: int = 50) -> list[dict[str, str]]:
        """Producer spaces that cannot be pruned and the first reason why."""
        out = []
        seen = set()
        for m in self.members:
            if m.kind != "out" or (m.owner, m.param) in seen:
                continue
            seen.add((m.owner, m.param))
            sp = self.spaces[m.space]
            labs = np.unique(self.labels[sp.base + m.index_map])
            locked = [int(u) for u in labs if self.unit_locked[u]]
            if locked:
                out.append(
                    {"layer": m.owner, "reason": self.unit_lock_reason.get(locked[0], "locked")}
                )
        return out[:limit] if limit else out


_ARITH = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
}


def _size_sources(v: Any, depth: int = 0) -> list[tuple[fx.Node, int]]:
    """``(tensor node, dim)`` pairs whose size an FX value was computed from."""
    if not isinstance(v, fx.Node) or depth > 8:
        return []
    if (
        v.op == "call_method"
        and v.target == "size"
        and len(v.args) >= 2
        and isinstance(v.args[1], int)
    ):
        return [(v.args[0], v.args[1])]
    if v.op == "call_function" and v.target is operator.getitem and isinstance(v.args[1], int):
        src = v.args[0]
        if isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
            or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        ):
            return [(src.args[0], v.args[1])]
    if v.op == "call_function" and v.target in _ARITH:
        return [p for a in v.args for p in _size_sources(a, depth + 1)]
    return []


def _reshape_groups(
    a: tuple[int, ...], b: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive dims of ``a`` and ``b`` whose products match (row-major reshape)."""
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa = a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb = b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing singleton dims into separate groups
        groups.append((gi, gj))
    return groups


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _leaf(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return f"{node.op} {_fn_name(node)}"
