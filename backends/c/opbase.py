"""The op interface every kernel table entry implements, the context kernels emit into, the
helpers their ``infer`` shares (window arithmetic, broadcasting, constant inputs) and the
convolution geometry every conv kernel takes (:class:`ConvGeometry`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from .ir import Node, Tensor, Unsupported


class EmitContext(Protocol):
    """What a kernel may ask of the code generator (``codegen.CodeGen`` implements it)."""

    def t(self, name: str) -> Tensor: ...

    def ptr(self, name: str) -> str:
        """A C expression: a pointer to the tensor's first element, of its C type."""

    def weight(self, arr: np.ndarray, hint: str) -> str:
        """Emit a derived constant array (e.g. repacked weights); returns its C symbol."""

    def helper(self, key: str, code: str) -> None:
        """Emit a ``static`` helper function once (``key`` identifies it)."""

    def scratch(self, ctype: str) -> str:
        """A C expression: a ``ctype *`` to the ``node.extra["scratch"]`` bytes of arena the
        node being emitted asked for (in use only during its step)."""


#: The specialised conv kernels in use. A test removes a name to get the generic kernel the
#: specialised one must match: "depthwise" (:mod:`.conv_dw`, float and int8), "packed" (float,
#: :mod:`.conv_fast`), "int8-gemm" (:mod:`.conv_q8`: int8 convs and fully-connected layers).
FAST: set[str] = {"depthwise", "packed", "int8-gemm"}


class Op:
    """One ONNX op type. ``infer`` checks a node and returns its outputs' (shape, dtype);
    ``emit`` returns the C statements that compute it.

    ``alias``: output 0 is input 0's bytes unchanged (Reshape and friends), so the planner
    gives it the same storage and ``emit`` is never called. ``inplace``: input indices whose
    buffer output 0 may overwrite when that input dies at this node (element-wise ops)."""

    alias: bool = False
    inplace: tuple[int, ...] = ()

    def prepare(self, node: Node, tensors: dict[str, Tensor], sparse_ok: bool) -> None:
        """Choose the kernel before the arena is planned (``emit`` follows the choice); set
        ``node.extra["scratch"]`` to the bytes of arena it needs during its step, if any.
        ``sparse_ok``: sparse weight storage is allowed."""

    def infer(self, node: Node, ins: list[Tensor | None]) -> list[tuple[Sequence[int], Any]]:
        raise NotImplementedError

    def emit(self, node: Node, cg: EmitContext) -> str:
        raise NotImplementedError

    def inplace_ok(self, node: Node, k: int, cg_tensors: dict[str, Tensor]) -> bool:
        """Whether output 0 may reuse input ``k``'s buffer (same size and dtype)."""
        x = cg_tensors[node.inputs[k]]
        y = cg_tensors[node.outputs[0]]
        return x.shape == y.shape and x.dtype == y.dtype


# -- helpers for infer() --------------------------------------------------------------------
def need(ins: list[Tensor | None], k: int, what: str) -> Tensor:
    if k >= len(ins) or ins[k] is None:
        raise Unsupported(f"missing input {k} ({what})")
    return ins[k]  # type: ignore[return-value]


def opt(ins: list[Tensor | None], k: int) -> Tensor | None:
    return ins[k] if k < len(ins) else None


def const_ints(ins: list[Tensor | None], k: int, what: str) -> list[int] | None:
    """The values of an optional integer input that must be a constant (shape-like inputs)."""
    t = opt(ins, k)
    if t is None:
        return None
    if t.value is None:
        raise Unsupported(
            f"input {what!r} ({t.name}) must be a constant (an initializer); the C "
            "backend compiles static shapes"
        )
    return [int(v) for v in np.asarray(t.value).reshape(-1)]


def float_only(node: Node, *ts: Tensor | None) -> None:
    for t in ts:
        if t is not None and t.dtype != np.float32:
            raise Unsupported(f"dtype {t.dtype} (only float32 is supported for {node.op})")


def norm_axis(axis: int, rank: int, node: Node) -> int:
    if not -rank <= axis < max(rank, 1):
        raise Unsupported(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise Unsupported(f"shapes {[tuple(s) for s in shapes]} do not broadcast") from None


def spatial_params(
    node: Node,
    x_shape: Sequence[int],
    kernel: Sequence[int],
    ceil_mode: bool = False,
    pool: bool = False,
) -> dict[str, list[int]]:
    """Strides, dilations, begin/end pads and output sizes of a conv or pool node."""
    nd = len(kernel)
    spatial = list(x_shape[2:])
    if len(spatial) != nd:
        raise Unsupported(f"kernel_shape {list(kernel)} does not match input rank {len(x_shape)}")
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = list(node.attr("pads", [0] * 2 * nd))
    auto_pad = node.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if len(strides) != nd or len(dil) != nd or len(pads) != 2 * nd:
        raise Unsupported("strides/dilations/pads do not match the kernel rank")
    if any(s < 1 for s in strides) or any(d < 1 for d in dil) or any(p < 0 for p in pads):
        raise Unsupported("non-positive strides/dilations or negative pads")
    out = []
    pb, pe = pads[:nd], pads[nd:]
    for i in range(nd):
        span = dil[i] * (kernel[i] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-spatial[i] // strides[i])
            total = max(0, (o - 1) * strides[i] + span - spatial[i])
            small, big = total // 2, total - total // 2
            pb[i], pe[i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pb[i] = pe[i] = 0
            o = (spatial[i] - span) // strides[i] + 1
        elif auto_pad in ("NOTSET", ""):
            num = spatial[i] + pb[i] + pe[i] - span
            if ceil_mode:
                o = -(-num // strides[i]) + 1
                if (o - 1) * strides[i] >= spatial[i] + pb[i]:
                    o -= 1
            else:
                o = num // strides[i] + 1
        else:
            raise Unsupported(f"auto_pad={auto_pad!r}")
        if o < 1:
            raise Unsupported(f"output size {o} < 1 along spatial axis {i}")
        out.append(o)
    return {"strides": strides, "dilations": dil, "pb": pb, "pe": pe, "out": out}


@dataclass(frozen=True)
class ConvGeometry:
    """A checked Conv node's sizes, as 2-d (a 1-d conv has ``H = OH = KH = 1``): the batch
    ``N``, then the argument list every C convolution kernel takes, in order: input channels
    and size ``C, H, W``, output channels and size ``M, OH, OW``, kernel ``KH, KW``, strides
    ``sh, sw``, dilations ``dh, dw``, begin pads ``ph, pw`` and groups ``G``.

    Built once by the Conv op's ``infer`` (``node.extra["geo"]``); the float, packed, sparse
    and int8 kernels all read it."""

    N: int
    C: int
    H: int
    W: int
    M: int
    OH: int
    OW: int
    KH: int
    KW: int
    sh: int
    sw: int
    dh: int
    dw: int
    ph: int
    pw: int
    G: int

    @classmethod
    def of(
        cls, x_shape: Sequence[int], w_shape: Sequence[int], p: dict[str, list[int]], group: int
    ) -> ConvGeometry:
        """From the input and weight shapes, :func:`spatial_params` and the group count."""
        if len(x_shape) == 3:  # 1-d: a 1 x W image
            hw, out, kernel = (1, x_shape[2]), (1, *p["out"]), (1, w_shape[2])
            st, dl, pb = (1, *p["strides"]), (1, *p["dilations"]), (0, *p["pb"])
        else:
            hw, out, kernel = x_shape[2:], p["out"], w_shape[2:]
            st, dl, pb = p["strides"], p["dilations"], p["pb"]
        values = (x_shape[0], x_shape[1], *hw, w_shape[0], *out, *kernel, *st, *dl, *pb, group)
        return cls(*(int(v) for v in values))

    def args(self, skip: Sequence[str] = ()) -> str:
        """The C argument list ``C, H, W, M, OH, OW, KH, KW, sh, sw, dh, dw, ph, pw, G`` as
        literals, without the names in ``skip`` (kernels with those sizes built in)."""
        names = [f.name for f in fields(self)][1:]
        unknown = set(skip) - set(names)
        if unknown:
            raise ValueError(f"not convolution arguments: {sorted(unknown)}")
        names = [f for f in names if f not in skip]
        return ", ".join(str(getattr(self, f)) for f in names)

    @property
    def x_size(self) -> int:
        """Elements of one image of the input (``C * H * W``)."""
        return self.C * self.H * self.W

    @property
    def y_size(self) -> int:
        """Elements of one image of the output (``M * OH * OW``)."""
        return self.M * self.OH * self.OW

    @property
    def depthwise(self) -> bool:
        """One input and one output channel per group."""
        return self.G == self.C == self.M
