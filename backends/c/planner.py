"""Static memory planning: where every tensor lives, and one arena for the intermediates.

Storage:

- graph inputs are read in place from ``inputs[k]``; graph outputs are written straight into
  ``outputs[k]`` (neither takes arena space);
- constants are ``const`` arrays in flash;
- every other tensor lives in a *buffer* in the arena. A view op (Reshape, Flatten, Squeeze,
  Unsqueeze, Identity) puts its output in its input's buffer; an element-wise op whose input
  dies at that node may write its output over that input (``Op.inplace``), and so may a
  kernel that reads each part of its input before writing over it, into an output no larger
  than that input (``Op.inplace_ok``: the depthwise conv, whatever its stride and padding,
  :func:`.conv_dw.may_overwrite`); with ``kernels_inplace=False`` only ops without a kernel
  choice (element-wise) reuse their input: the layer-by-layer plan;
- the working memory a kernel asks for (``node.extra["scratch"]`` bytes: a padded plane, an
  im2col tile) is a buffer too, live during that node's step only.

A buffer lives from the step that first writes it to the last step that reads any tensor in it,
inclusive (inputs and outputs of one step are live together). The **lower bound** is the
largest sum of the bytes of the buffers live at one step: no placement of those buffers can
use less. Offsets come from the greedy-by-size planner of TensorFlow Lite Micro
(``GreedyMemoryPlanner``): buffers in decreasing size, each at the lowest offset where it
overlaps no already placed buffer whose lifetime meets its own. A second order (longest
lifetime first) is tried too and the smaller arena kept. Offsets are multiples of ``ALIGN``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .ir import Program

log = logging.getLogger(__name__)

ALIGN = 16


@dataclass
class Buffer:
    id: int
    nbytes: int
    first: int
    last: int
    tensors: list[str] = field(default_factory=list)
    offset: int = -1

    @property
    def padded(self) -> int:
        return (self.nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Plan:
    # tensor name -> ("input", k) | ("output", k) | ("const", None) | ("arena", byte offset)
    where: dict[str, tuple[str, int | None]]
    buffers: list[Buffer]
    arena_bytes: int
    lower_bound: int
    copies: list[tuple[str, int]]  # (tensor, output index) copied at the end of the run
    inplace: int = 0
    aliased: int = 0
    scratch: dict[int, int] = field(default_factory=dict)  # step -> byte offset
    activations: int = 0  # the largest sum of live tensor buffers at one step (no scratch)


def plan(prog: Program, ops: dict, kernels_inplace: bool = True) -> Plan:
    """Assign storage to every tensor of ``prog`` (nodes already in schedule order)."""
    t = prog.tensors
    where: dict[str, tuple[str, int | None]] = {}
    for k, name in enumerate(prog.inputs):
        where[name] = ("input", k)
    out_index: dict[str, int] = {}
    copies: list[tuple[str, str]] = []
    for k, name in enumerate(prog.outputs):
        if name in out_index or name in where or t[name].is_const:
            copies.append((name, k))  # written by a copy at the end of the run
            continue
        out_index[name] = k
    for name, tensor in t.items():
        if tensor.is_const and name not in where:
            where[name] = ("const", None)

    last_use: dict[str, int] = {}
    for step, node in enumerate(prog.nodes):
        for i in node.inputs:
            if i:
                last_use[i] = step

    buf_of: dict[str, Buffer] = {}
    buffers: list[Buffer] = []
    n_inplace = n_alias = 0

    def buffer_last(b: Buffer) -> int:
        return max([b.last] + [last_use.get(m, -1) for m in b.tensors])

    for step, node in enumerate(prog.nodes):
        op = ops[node.op]
        for j, out in enumerate(node.outputs):
            if not out:
                continue
            if out in out_index:
                where[out] = ("output", out_index[out])
                continue
            src = node.inputs[0] if node.inputs else ""
            if j == 0 and op.alias and src in buf_of:
                b = buf_of[src]
                b.tensors.append(out)
                buf_of[out] = b
                n_alias += 1
                continue
            if j == 0 and op.alias and src in where and where[src][0] == "input":
                where[out] = where[src]  # a view of a graph input reads it in place
                n_alias += 1
                continue
            reused = None
            if j == 0 and (kernels_inplace or "kernel" not in node.extra):
                for k in op.inplace:
                    if k >= len(node.inputs) or node.inputs[k] not in buf_of:
                        continue
                    b = buf_of[node.inputs[k]]
                    others = [i for i in node.inputs if i and i != node.inputs[k]]
                    if (
                        buffer_last(b) == step
                        and t[out].nbytes <= b.nbytes
                        and op.inplace_ok(node, k, t)
                        and not any(buf_of.get(i) is b for i in others)
                    ):
                        reused = b
                        break
            if reused is not None:
                reused.tensors.append(out)
                buf_of[out] = reused
                n_inplace += 1
                continue
            b = Buffer(len(buffers), t[out].nbytes, step, step, [out])
            buffers.append(b)
            buf_of[out] = b
    for b in buffers:
        b.last = buffer_last(b)
    scratch_of: dict[int, Buffer] = {}
    for step, node in enumerate(prog.nodes):
        nbytes = int(node.extra.get("scratch", 0))
        if nbytes > 0:  # a kernel's working memory, live during its step only
            scratch_of[step] = Buffer(len(buffers), nbytes, step, step, [])
            buffers.append(scratch_of[step])
    end = len(prog.nodes)

    lower = activations = 0
    for step in range(end + 1):
        live = [b for b in buffers if b.first <= step <= b.last]
        lower = max(lower, sum(b.nbytes for b in live))
        activations = max(activations, sum(b.nbytes for b in live if b.tensors))

    best = None
    for key in (lambda b: (-b.padded, b.first), lambda b: (-(b.last - b.first), -b.padded)):
        offsets, size = _greedy(buffers, key)
        if best is None or size < best[1]:
            best = (offsets, size)
    assert best is not None
    for b in buffers:
        b.offset = best[0][b.id]
        for m in b.tensors:
            where[m] = ("arena", b.offset)
    log.debug(
        "planned %d buffers: arena %d bytes, lower bound %d (%d in place, %d views)",
        len(buffers),
        best[1],
        lower,
        n_inplace,
        n_alias,
    )
    scratch = {step: b.offset for step, b in scratch_of.items()}
    return Plan(where, buffers, best[1], lower, copies, n_inplace, n_alias, scratch, activations)


def _greedy(buffers: list[Buffer], key) -> tuple[dict[int, int], int]:
    placed: list[tuple[int, int, Buffer]] = []  # (offset, end, buffer)
    offsets: dict[int, int] = {}
    for b in sorted(buffers, key=key):
        if b.nbytes == 0:
            offsets[b.id] = 0
            continue
        clash = sorted((o, e) for o, e, p in placed if p.first <= b.last and b.first <= p.last)
        off = 0
        for o, e in clash:
            if o - off >= b.padded:
                break
            off = max(off, e)
        offsets[b.id] = off
        placed.append((off, off + b.padded, b))
    size = max((e for _, e, _ in placed), default=0)
    return offsets, size
