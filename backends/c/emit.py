"""The driver: ONNX model -> checked program -> fused -> planned -> C files + report.json."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.atomic import write_json, write_text
from graphopt.errors import BackendError

from . import ir, planner
from .codegen import CodeGen, stamp
from .kernels_data import DATA_OPS
from .kernels_dynamic import DYNAMIC_OPS
from .kernels_float import FLOAT_OPS
from .kernels_int8 import INT8_OPS
from .kernels_math import MATH_OPS
from .kernels_pool import POOL_OPS
from .kernels_transformer import TRANSFORMER_OPS
from .matmul_q8 import QMATMUL_OPS
from .patches import PATCH_OPS
from .patches import choose as choose_patches
from .qdq_lower import lower_qdq

log = logging.getLogger(__name__)

OPS: dict[str, Any] = {
    **DATA_OPS,
    **FLOAT_OPS,
    **MATH_OPS,
    **POOL_OPS,
    **TRANSFORMER_OPS,
    **INT8_OPS,
    **DYNAMIC_OPS,
    **QMATMUL_OPS,
}
_FUSE_INTO = ("Conv", "Gemm", "MatMul", "Add")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def supported_ops() -> list[str]:
    """The ONNX op types the C backend compiles. Constant, Shape and Size always fold (shapes
    are static); any other node whose inputs are all constant folds too."""
    return sorted([k for k in OPS if not k.endswith("_i8")] + ["Constant", "Shape", "Size"])


def compile_program(model, input_shapes=None, int8: bool = True) -> ir.Program:
    """Load, check, lower QDQ groups and fuse activations (no files written)."""
    prog = ir.load(model, {k: v for k, v in OPS.items() if not k.endswith("_i8")}, input_shapes)
    if int8:
        lower_qdq(prog)
    fuse_activations(prog)
    return prog


def fuse_activations(prog: ir.Program) -> int:
    """Fold a Relu or constant Clip into the float Conv/Gemm/MatMul/Add producing its input
    when that tensor has no other reader and is not a graph output."""
    readers = Counter(i for n in prog.nodes for i in n.inputs if i)
    producer = {o: n for n in prog.nodes for o in n.outputs if o}
    drop = set()
    for node in prog.nodes:
        if node.op not in ("Relu", "Clip") or not node.inputs:
            continue
        x = node.inputs[0]
        p = producer.get(x)
        if (
            p is None
            or p.op not in _FUSE_INTO
            or readers[x] != 1
            or x in prog.outputs
            or p.extra.get("act")
            or prog.t(x).dtype != np.float32
            or id(p) in drop
        ):
            continue
        if node.op == "Relu":
            act = ("relu",)
        else:
            lo, hi = node.extra.get("lo"), node.extra.get("hi")
            if isinstance(lo, tuple) or isinstance(hi, tuple):
                continue  # bounds known only at run time
            lo_v = _bound(node, prog, 1, "min", -np.inf)
            hi_v = _bound(node, prog, 2, "max", np.inf)
            act = ("clip", lo_v, hi_v)
        p.extra["act"] = act
        p.extra["fused"] = f"{node.op} {node.name!r}"
        p.outputs[p.outputs.index(x)] = node.outputs[0]
        drop.add(id(node))
    prog.nodes = [n for n in prog.nodes if id(n) not in drop]
    return len(drop)


def _bound(node: ir.Node, prog: ir.Program, k: int, attr: str, default: float) -> float:
    if node.opset < 11:
        return float(node.attr(attr, default))
    if k < len(node.inputs) and node.inputs[k]:
        return float(np.asarray(prog.t(node.inputs[k]).value).reshape(-1)[0])
    return default


def emit(
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "model",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    sparse: bool = True,
    patches: int | None = None,
    ram_budget: int | None = None,
) -> dict[str, Any]:
    """Write ``<name>.h``, ``<name>.c``, ``<name>_weights.c`` and ``report.json`` to
    ``out_dir`` and return the report.

    The model must have static shapes; a symbolic dimension 0 of an input (the batch) is fixed
    to 1, other symbolic dimensions need ``input_shapes={input: shape}``. Unsupported ops or
    attributes raise one :class:`~graphopt.errors.BackendError` listing every offending node
    before anything is written; each file is written atomically. With ``sparse`` (default) a
    conv or fully-connected layer whose constant weights are mostly zero is stored as a
    relative-index stream when that is smaller than dense (:mod:`.sparse`); the report lists
    those layers.

    ``patches=N`` runs the first stages of the network on an ``N x N`` grid of patches of a
    cut tensor the planner chooses (the smallest arena, :mod:`.patches`), so their large
    activations never exist in full; ``ram_budget=BYTES`` chooses the grid and the cut that
    keep the arena within ``BYTES`` with the least recomputation (no patches if the plain plan
    fits). Either raises a :class:`~graphopt.errors.BackendError` naming the option when no
    cut exists or the budget cannot be met. The report's ``memory`` gives the arena
    layer by layer, with in-place kernels, and as emitted; ``patches`` the cut, the grid and
    the recompute overhead.
    """
    if not _NAME.match(name):
        raise BackendError(f"name {name!r} is not a C identifier")
    prog = compile_program(onnx_model_or_path, input_shapes)
    for node in prog.nodes:
        OPS[node.op].prepare(node, prog.tensors, sparse)
    ops, run = OPS, prog
    layerwise = planner.plan(prog, OPS, kernels_inplace=False).arena_bytes
    patched = None
    if patches is not None or ram_budget is not None:
        patched, _ = choose_patches(prog, OPS, patches, ram_budget, sparse)
        if patched is not None:
            ops, run = {**OPS, **PATCH_OPS}, patched.prog
    plan = planner.plan(run, ops)
    cg = CodeGen(run, plan, name, ops)
    cg.sparse = sparse
    src, weights = cg.source(plan.arena_bytes)
    header = cg.header(plan.arena_bytes)
    report = _report(prog, plan, cg, name, onnx_model_or_path)
    report["memory"] = {
        "arena_layer_by_layer_bytes": layerwise,
        "arena_in_place_bytes": (
            patched.info["arena_unpatched_bytes"] if patched else plan.arena_bytes
        ),
        "arena_bytes": plan.arena_bytes,
        "activations_peak_bytes": plan.activations,
    }
    report["patches"] = patched.info if patched is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.h", header)
    write_text(out / f"{name}.c", src)
    write_text(out / f"{name}_weights.c", weights)
    write_json(out / "report.json", report)
    log.info(
        "emitted %s/%s.{h,c}: %d nodes, %d weight bytes, arena %d bytes (lower bound %d)",
        out,
        name,
        len(prog.nodes),
        report["weight_bytes"],
        plan.arena_bytes,
        plan.lower_bound,
    )
    return report


def _report(prog, plan, cg, name, source) -> dict[str, Any]:
    counts = Counter(n.op for n in prog.nodes)
    fused = Counter(n.extra["fused"].split(" ")[0] for n in prog.nodes if n.extra.get("fused"))

    def io(names):
        return [
            {"name": n, "dtype": prog.t(n).dtype.name, "shape": list(prog.t(n).shape)}
            for n in names
        ]

    return {
        "name": name,
        "source": str(source) if not isinstance(source, onnx.ModelProto) else "<ModelProto>",
        "generated": stamp(),
        "files": [f"{name}.h", f"{name}.c", f"{name}_weights.c"],
        "inputs": io(prog.inputs),
        "outputs": io(prog.outputs),
        "op_counts": dict(sorted(counts.items())),
        "fused_activations": dict(sorted(fused.items())),
        "folded_nodes": prog.folded,
        "weight_bytes": cg.weight_bytes(),
        "sparse_layers": cg.sparse_layers,
        "arena_bytes": plan.arena_bytes,
        "arena_lower_bound_bytes": plan.lower_bound,
        "arena_ratio": round(plan.arena_bytes / plan.lower_bound, 4) if plan.lower_bound else 1.0,
        "arena_align": planner.ALIGN,
        "buffers": len(plan.buffers),
        "in_place_ops": plan.inplace,
        "views": plan.aliased,
        "notes": list(prog.notes),  # lowering decisions, e.g. a layer kept in float and why
    }
