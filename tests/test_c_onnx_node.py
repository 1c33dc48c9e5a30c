"""ONNX's own backend node tests against the C backend, one compiled library per op type.

``onnx.backend.test.case.node.collect_testcases`` yields every node test case (model, inputs,
expected outputs, rtol/atol). For each op type the C backend supports, every case whose model
uses only supported ops is emitted; integer inputs that set shapes (Reshape's shape, Slice's
starts, ...) become initializers first, since the backend compiles static shapes. Cases the
backend's own support check refuses (an attribute, a dtype, training mode, ...) must raise a
``BackendError``; they are counted as skipped with the reason. All other cases must compile,
run and match within the case's tolerances. Each test prints its op's counts (``-rP``).

Cases with float weights passed as graph inputs are also run a second time with those inputs
turned into initializers, which exercises the constant-weight kernels (packed convolution,
repacked Gemm, folded BatchNorm).
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.backends.c import UnsupportedError, build_many, supported_ops

SUPPORTED = set(supported_ops())
# inputs at these positions are weights: also test them as initializers
_PARAM_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2)}
_WEIGHT_INPUTS = {
    "Conv": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
}


@functools.lru_cache(maxsize=1)
def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    by_op = defaultdict(list)
    for case in cases:
        ops = [n.op_type for n in case.model.graph.node]
        if (
            not ops
            or not set(ops) <= SUPPORTED
            or any(n.domain not in ("", "ai.onnx") for n in case.model.graph.node)
        ):
            continue
        main = next((o for o in ops if o != "Constant"), ops[0])
        by_op[main].append(case)
    return dict(by_op)


def _freeze(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names) -> onnx.ModelProto:
    """Turn the graph inputs ``names`` into initializers holding ``feeds[name]``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [i for i in m.graph.input if i.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for n in names:
        v = feeds[n]
        if isinstance(v, onnx.TensorProto):  # float8/int4 data come as TensorProto
            t = onnx.TensorProto()
            t.CopyFrom(v)
            t.name = n
            m.graph.initializer.append(t)
        else:
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), n))
    return m


def _variants(case):
    """(label, model, runtime inputs, expected outputs) for each data set of a case."""
    g = case.model.graph
    in_names = [i.name for i in g.input if i.name not in {x.name for x in g.initializer}]
    for k, (inputs, outputs) in enumerate(case.data_sets):
        feeds = dict(zip(in_names, inputs))
        shape_like = {
            n.input[j]
            for n in g.node
            for j in range(1, len(n.input))
            if n.input[j] in feeds and np.asarray(feeds[n.input[j]]).dtype == np.int64
        }
        # a case whose *data* input is an int64 (e.g. Identity on int64) keeps it at run time
        shape_like -= {n.input[0] for n in g.node if n.input}
        # quantization parameters must be constants for the C backend (it specialises on them)
        shape_like |= {
            n.input[j]
            for n in g.node
            for j in _PARAM_INPUTS.get(n.op_type, ())
            if j < len(n.input) and n.input[j] in feeds
        }
        model = _freeze(case.model, feeds, shape_like)
        rest = [n for n in in_names if n not in shape_like]
        yield f"{case.name}#{k}", model, [feeds[n] for n in rest], outputs
        weights = {
            n.input[j]
            for n in g.node
            for j in _WEIGHT_INPUTS.get(n.op_type, ())
            if j < len(n.input) and n.input[j] in rest
        }
        if weights:
            model_w = _freeze(model, feeds, weights)
            rest_w = [n for n in rest if n not in weights]
            yield (f"{case.name}#{k}:const-weights", model_w, [feeds[n] for n in rest_w], outputs)


def _array(v) -> np.ndarray:
    """A data set's value as numpy (some cases, e.g. Cast's, store TensorProtos)."""
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def _run_op(op: str):
    variants = [v for case in _cases()[op] for v in _variants(case)]
    names = {f"t{i}": v for i, v in enumerate(variants)}
    built = build_many({n: v[1] for n, v in names.items()})
    passed, skipped, failed = [], [], []
    for n, (label, _model, inputs, expected) in names.items():
        res = built[n]
        if isinstance(res, Exception):
            if isinstance(res, UnsupportedError):
                skipped.append(f"{label}: {str(res)[:200]}")
            else:
                failed.append(f"{label}: {type(res).__name__}: {str(res)[:600]}")
            continue
        try:
            got = res.run(*map(_array, inputs))
            case_tol = next(c for c in _cases()[op] if c.name == label.split("#")[0])
            for g, e in zip(got, expected):
                e = _array(e)
                assert g.shape == e.shape, f"shape {g.shape} != {e.shape}"
                if e.dtype.kind in "iub":
                    np.testing.assert_array_equal(g, e)
                else:
                    np.testing.assert_allclose(g, e, rtol=case_tol.rtol, atol=case_tol.atol)
            passed.append(label)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            failed.append(f"{label}: {str(e)[:600]}")
    return passed, skipped, failed


OPS = sorted(_cases())


def test_every_supported_op_has_cases():
    missing = SUPPORTED - set(OPS) - {"Constant"}
    assert not missing, f"no ONNX node test cases found for {sorted(missing)}"


@pytest.mark.parametrize("op", OPS)
def test_onnx_node_cases(op):
    passed, skipped, failed = _run_op(op)
    print(f"{op}: {len(passed)} passed, {len(skipped)} skipped, {len(failed)} failed")
    for s in skipped:
        print("  skipped", s)
    assert not failed, f"{op}: {len(failed)} failed:\n" + "\n".join(failed)
    assert passed, f"{op}: no case passed"
