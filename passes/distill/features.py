"""Feature taps on graph nodes, and the pairing of student nodes with teacher nodes.

A *tap* reads the value of an FX node during a forward pass. :class:`FeatureTaps` builds, for
the duration of a ``with`` block, a second GraphModule over the same submodules and parameters
whose output is ``(original_output, [tapped values])``: any node can be tapped (a module call,
a residual add, a reshape), and nothing is attached to the user's graph, so there is nothing to
forget to remove. Leaving the block drops the tapped module.

Pairs are written ``student:teacher`` where each side is a node name or a module path. With
``auto`` the pairs come from **provenance**: a student node is keyed by the original module
path it came from (the last entry of its provenance after a fusion, else its module path) and
by which call of that module it is, which survives pruning (paths are kept) and BN folding
(the folded conv carries the BN's path), so the student's conv pairs with the teacher's BN.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from graphopt.errors import OptionError
from graphopt.graph import Graph, node_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturePair:
    student: str  # node names
    teacher: str

    def __str__(self) -> str:
        return f"{self.student}:{self.teacher}"


def tapped_module(gm: fx.GraphModule, nodes: Sequence[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and parameters that returns
    ``(output, [value of each node in nodes])``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    taps = [env[by_name[name]] for name in nodes]
    graph.output((out, taps))
    return fx.GraphModule(gm, graph, class_name="Tapped" + type(gm).__name__)


@contextmanager
def feature_taps(gm: fx.GraphModule, nodes: Sequence[str]) -> Iterator[fx.GraphModule]:
    """``with feature_taps(gm, names) as tapped:`` ``tapped(*x)`` returns ``(out, feats)``.

    The tapped module exists only inside the block; ``gm`` itself is never modified."""
    tapped = tapped_module(gm, nodes)
    try:
        yield tapped
    finally:
        del tapped


# -- resolving names ----------------------------------------------------------------------------
def resolve_node(graph: Graph, name: str, role: str) -> str:
    """The node named ``name``, else the last call of the module at path ``name``, else the
    node that module was fused into (its provenance), else the last node it created."""
    nodes = graph.nodes
    for n in nodes:
        if n.name == name:
            return n.name
    by_path = [n for n in nodes if n.op == "call_module" and n.target == name]
    if not by_path:  # a module folded into another node (BN into its conv) lives on there
        by_path = [n for n in nodes if name in node_meta(n).provenance]
    if not by_path:
        by_path = [n for n in nodes if node_meta(n).module_path == name]
    if by_path:
        return by_path[-1].name
    candidates = [n.name for n in nodes] + sorted(
        {str(n.target) for n in nodes if n.op == "call_module"}
    )
    near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    hint = f"; nearest: {', '.join(near)}" if near else ""
    raise OptionError(f"distill: {role} feature {name!r} matches no node name or module path{hint}")


def parse_pairs(student: Graph, teacher: Graph, specs: Sequence[str]) -> list[FeaturePair]:
    """Resolve ``student:teacher`` specs (a spec without ``:`` names the same node or module
    path in both graphs) to node names."""
    pairs = []
    for spec in specs:
        s, sep, t = spec.partition(":")
        if not sep:
            t = s
        if not s or not t:
            raise OptionError(f"distill: feature pair {spec!r} must be student:teacher")
        pairs.append(
            FeaturePair(resolve_node(student, s, "student"), resolve_node(teacher, t, "teacher"))
        )
    return pairs


# -- auto pairing by provenance -----------------------------------------------------------------
def _origin_keys(graph: Graph) -> dict[tuple[str, int], fx.Node]:
    """``(original module path, k-th call) -> node`` for every module-call node."""
    keys: dict[tuple[str, int], fx.Node] = {}
    seen: dict[str, int] = {}
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        meta = node_meta(n)
        path = meta.provenance[-1] if meta.provenance else str(n.target)
        k = seen.get(path, 0)
        seen[path] = k + 1
        keys[(path, k)] = n
    return keys


def _output_nodes(graph: Graph) -> set[str]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return {a.name for a in out.all_input_nodes}


def auto_pairs(student: Graph, teacher: Graph, limit: int = 4) -> list[FeaturePair]:
    """Pair student and teacher module-call nodes by provenance and keep, for each spatial
    resolution (4-D and 5-D tensors), the last matched node before it changes; models without
    such tensors get up to ``limit`` matched nodes evenly spaced in depth. A pair may differ in
    one dimension (pruned channels, or a transformer's pruned hidden width): a learned adapter
    maps the student's width to the teacher's. Graph outputs are never paired (the logits
    already are)."""
    s_keys, t_keys = _origin_keys(student), _origin_keys(teacher)
    excluded = _output_nodes(student)
    matched: list[tuple[fx.Node, fx.Node]] = []
    for key, sn in s_keys.items():
        tn = t_keys.get(key)
        if tn is None or sn.name in excluded:
            continue
        s_shape, t_shape = node_meta(sn).shape, node_meta(tn).shape
        if s_shape is None or t_shape is None or len(s_shape) != len(t_shape) or len(s_shape) < 2:
            continue
        if s_shape[0] != t_shape[0] or sum(a != b for a, b in zip(s_shape, t_shape)) > 1:
            continue  # one (channel) dimension may differ: dim 1 of an image, the last of tokens
        matched.append((sn, tn))
    spatial = [(s, t) for s, t in matched if len(node_meta(s).shape or ()) >= 4]
    chosen: list[tuple[fx.Node, fx.Node]] = []
    if spatial:
        for i, (s, t) in enumerate(spatial):
            nxt = spatial[i + 1][0] if i + 1 < len(spatial) else None
            if nxt is None or node_meta(nxt).shape[2:] != node_meta(s).shape[2:]:
                chosen.append((s, t))
        chosen = chosen[-limit:]
    elif matched:
        # token models: the hidden states (outputs of the norms on the residual stream, as
        # TinyBERT distils them) when there are any, else any module outputs
        hidden = [(s, t) for s, t in matched if _is_norm(student, s)] or matched
        step = max(1, len(hidden) // limit)
        chosen = hidden[step - 1 :: step][-limit:]
    pairs = [FeaturePair(s.name, t.name) for s, t in chosen]
    log.info("distill: auto feature pairs %s", ", ".join(map(str, pairs)) or "(none)")
    return pairs


def _is_norm(graph: Graph, node: fx.Node) -> bool:
    """Whether ``node`` calls a LayerNorm / RMSNorm-like module (by type, or a class name
    ending in ``Norm`` as Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``)."""
    mod = graph.module.get_submodule(str(node.target))
    return isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or type(mod).__name__.endswith("Norm")


# -- attention projections (MiniLM) -------------------------------------------------------------
_RESHAPES = {"view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten"}


def _projection(node: object) -> fx.Node | None:
    """The module call whose output reaches ``node`` through reshapes and transposes only."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            return node
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_method", "call_function") or name not in _RESHAPES:
            return None
        node = node.args[0] if node.args else None
    return None


def attention_pairs(student: Graph, teacher: Graph) -> list[FeaturePair]:
    """The query, key and value projections of the teacher's last attention layer (the module
    calls feeding its last ``scaled_dot_product_attention`` through reshapes), each paired with
    the student's call of the same module by provenance: MiniLM's choice of features for
    :func:`~graphopt.passes.distill.losses.relation_loss`."""
    sdpa = [
        n
        for n in teacher.nodes
        if n.op == "call_function"
        and getattr(n.target, "__name__", "") == "scaled_dot_product_attention"
    ]
    if not sdpa:
        raise OptionError(
            "distill: features=attention found no scaled_dot_product_attention in the teacher "
            "(nn.MultiheadAttention computes q, k and v inside one module); name the pairs "
            "instead, e.g. features=layer.3.attn.q:layer.3.attn.q"
        )
    last = sdpa[-1]
    projections = [_projection(a) for a in list(last.args[:3])]
    if any(p is None for p in projections):
        raise OptionError(
            f"distill: features=attention: the inputs of {last.name!r} do not come from module "
            "calls through reshapes only; name the pairs instead"
        )
    by_node = {n: key for key, n in _origin_keys(teacher).items()}
    s_keys = _origin_keys(student)
    pairs = []
    for proj in projections:
        sn = s_keys.get(by_node[proj])
        if sn is None:
            raise OptionError(
                f"distill: features=attention: the student has no call of {by_node[proj][0]!r}"
            )
        pairs.append(FeaturePair(sn.name, proj.name))
    log.info("distill: attention pairs (q, k, v) %s", ", ".join(map(str, pairs)))
    return pairs


# -- adapters -----------------------------------------------------------------------------------
class ChannelAdapter(nn.Module):
    """A learned linear map of one dimension (the channels) from the student's width to the
    teacher's: a 1x1 convolution for ``[N, C, H, W]``, a linear layer for ``[N, C]``. Dropped
    after training."""

    def __init__(self, c_in: int, c_out: int, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)

    @torch.no_grad()
    def fit(self, s: torch.Tensor, t: torch.Tensor, ridge: float = 1e-3) -> None:
        """Initialise by ridge regression on one batch:
        ``[W b] = argmin ‖[S 1][W b]ᵀ - T‖² + λ‖W‖²`` with rows the positions of the batch."""
        xs = s.movedim(self.dim, -1).reshape(-1, s.shape[self.dim]).double()
        xt = t.movedim(self.dim, -1).reshape(-1, t.shape[self.dim]).double()
        a = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1)
        reg = ridge * torch.eye(a.shape[1], dtype=a.dtype) * (a * a).mean()
        reg[-1, -1] = 0
        sol = torch.linalg.solve(a.T @ a + reg, a.T @ xt)
        self.linear.weight.copy_(sol[:-1].T.float())
        self.linear.bias.copy_(sol[-1].float())


def adapter_for(s_shape: tuple[int, ...], t_shape: tuple[int, ...], pair: FeaturePair):
    """``None`` when shapes are equal, else a :class:`ChannelAdapter` for the one differing
    dimension; anything else is an error naming the pair."""
    if tuple(s_shape) == tuple(t_shape):
        return None
    diff = [d for d, (a, b) in enumerate(zip(s_shape, t_shape)) if a != b]
    if len(s_shape) != len(t_shape) or len(diff) != 1 or diff[0] == 0:
        raise OptionError(
            f"distill: feature pair {pair} has shapes {tuple(s_shape)} and {tuple(t_shape)}; "
            "they may differ only in one (channel) dimension"
        )
    d = diff[0]
    return ChannelAdapter(s_shape[d], t_shape[d], d)
