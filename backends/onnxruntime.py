"""ONNX Runtime backend: export a :class:`~graphopt.graph.Graph` to ONNX
(:mod:`graphopt.backends.onnx_export`, re-exported here as :func:`export`), run it, check it.

``session``/``run`` wrap ONNX Runtime on the CPU, ``check_parity`` compares torch against ORT
with :mod:`graphopt.metrics`, and ``benchmark``/``torch_benchmark`` time repeated runs.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

from graphopt.atomic import atomic_path
from graphopt.errors import BackendError
from graphopt.graph import Graph
from graphopt.metrics import drift, within

from .onnx_export import (  # noqa: F401  (the public names of the backend)
    MODULE_PATH_KEY,
    NODE_KEY,
    PIPELINE_KEY,
    PROVENANCE_KEY,
    _first_line,
    export,
)

log = logging.getLogger(__name__)


def session(
    path: str | os.PathLike,
    threads: int = 1,
    optimized_model_path: str | os.PathLike | None = None,
    reference: bool = False,
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for ``path``: ``threads`` intra-op threads, one inter-op
    thread, sequential execution. ``optimized_model_path`` saves ORT's optimised graph there
    (atomically).

    ``reference=True`` turns ORT's graph optimisations off, so a QDQ model runs as the ONNX
    operator definitions say (DequantizeLinear -> float op -> QuantizeLinear) and not through
    fused integer kernels: the same result on every CPU, which fused ``u8 x s8`` kernels on x86
    without VNNI do not give (see :mod:`graphopt.cpu`)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"no ONNX file at {p}; export one with graphopt.backends.onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if reference:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if optimized_model_path is None:
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        if Path(optimized_model_path).suffix == ".ort":
            opts.add_session_config_entry("session.save_model_format", "ORT")
        with atomic_path(optimized_model_path) as tmp:
            opts.optimized_model_filepath = str(tmp)
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load {p}: {_first_line(e)}") from e


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _feed(sess: ort.InferenceSession, arrays: Sequence[Any]) -> dict[str, np.ndarray]:
    specs = sess.get_inputs()
    if len(arrays) != len(specs):
        want = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
        raise BackendError(
            f"the ONNX model takes {len(specs)} input(s) ({want}), got {len(arrays)}"
        )
    feed = {}
    for spec, x in zip(specs, arrays):
        a = _as_numpy(x)
        dtype = _ORT_TO_NUMPY.get(spec.type)
        if dtype is not None and a.dtype != dtype:
            a = a.astype(dtype)
        feed[spec.name] = np.ascontiguousarray(a)
    return feed


def run(sess_or_path: ort.InferenceSession | str | os.PathLike, *arrays: Any) -> list[np.ndarray]:
    """Run the model on ``arrays`` (numpy arrays or tensors, in input order); list of outputs."""
    sess = sess_or_path if isinstance(sess_or_path, ort.InferenceSession) else session(sess_or_path)
    feed = _feed(sess, arrays)
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
        raise BackendError(f"ONNX Runtime failed on inputs {shapes}: {_first_line(e)}") from e


def _as_inputs(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return (inputs,)
    return tuple(inputs)


def check_parity(
    graph: Graph,
    path: str | os.PathLike,
    inputs: Any = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    *,
    batches: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Compare ``graph.module`` (torch) against the ONNX file at ``path`` (ORT) on ``inputs``
    (default: the graph's example inputs), or on each of ``batches`` (e.g.
    :func:`graphopt.data.probe_inputs`), keeping the worst.

    Returns ``max_abs``, ``rel``, ``cosine``, ``top1`` (2-D first output only) and ``ok``:
    ``max|ort - torch| <= atol + rtol * max|torch|`` for every output (and every batch; then
    also ``inputs_checked`` and ``worst_input``, the index of the worst batch).
    """
    if batches is not None:
        sess = session(path)
        results = [check_parity(graph, sess, b, rtol, atol) for b in batches]
        worst = max(range(len(results)), key=lambda i: (not results[i]["ok"], results[i]["rel"]))
        out = dict(results[worst])
        out["ok"] = all(r["ok"] for r in results)
        out["cosine"] = min(r["cosine"] for r in results)
        out["inputs_checked"] = len(results)
        out["worst_input"] = worst
        return out
    xs = tuple(
        torch.as_tensor(x) for x in _as_inputs(graph.example_inputs if inputs is None else inputs)
    )
    with torch.no_grad():
        expected = [
            t.detach() for t in pytree.tree_leaves(graph.module(*xs)) if isinstance(t, torch.Tensor)
        ]
    got = [torch.from_numpy(np.asarray(a)) for a in run(path, *xs)]
    result: dict[str, Any] = {"outputs": len(got)}
    shapes_ok = len(got) == len(expected) and all(
        tuple(a.shape) == tuple(b.shape) for a, b in zip(got, expected)
    )
    if not shapes_ok:
        result.update(
            max_abs=float("inf"),
            rel=float("inf"),
            cosine=float("nan"),
            ok=False,
            error=(
                f"ORT outputs {[list(a.shape) for a in got]} vs torch "
                f"{[list(b.shape) for b in expected]}"
            ),
        )
        return result
    result.update(drift(got, expected))
    result["ok"] = bool(within(got, expected, rtol=rtol, atol=atol))
    return result


# -- timing -------------------------------------------------------------------------------------
def _stats(times_s: list[float], threads: int) -> dict[str, Any]:
    ms = np.asarray(times_s) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "mean_ms": float(ms.mean()),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "stdev_ms": float(statistics.stdev(ms)) if len(ms) > 1 else 0.0,
        "runs": len(ms),
        "threads": threads,
    }


def _timed(fn, warmup: int, runs: int, min_seconds: float) -> list[float]:
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _dummy_inputs(sess: ort.InferenceSession) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for spec in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _ORT_TO_NUMPY.get(spec.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            out.append(rng.standard_normal(shape).astype(dtype))
        else:
            out.append(np.zeros(shape, dtype=dtype))
    return out


def benchmark(
    path: str | os.PathLike,
    threads: int = 1,
    inputs: Any = None,
    warmup: int = 5,
    runs: int = 30,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Latency of the ONNX model at ``path`` in ORT: ``warmup`` untimed runs, then at least
    ``runs`` timed runs (and at least ``min_seconds``). Without ``inputs``, random inputs of
    the model's input shapes (dynamic dimensions set to 1)."""
    sess = session(path, threads=threads)
    arrays = _dummy_inputs(sess) if inputs is None else list(_as_inputs(inputs))
    feed = _feed(sess, arrays)
    times = _timed(lambda: sess.run(None, feed), warmup, runs, min_seconds)
    result = _stats(times, threads)
    result["batch"] = int(next(iter(feed.values())).shape[0]) if feed else 0
    return result


def torch_benchmark(
    module: torch.nn.Module | Graph,
    inputs: Any,
    threads: int = 1,
    warmup: int = 3,
    runs: int = 20,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Latency of ``module(*inputs)`` in torch (inference mode) with ``threads`` threads; the
    previous thread count is restored afterwards. Same keys as :func:`benchmark`."""
    mod = module.module if isinstance(module, Graph) else module
    xs = tuple(torch.as_tensor(x) for x in _as_inputs(inputs))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = _timed(lambda: mod(*xs), warmup, runs, min_seconds)
    finally:
        torch.set_num_threads(before)
    result = _stats(times, threads)
    result["batch"] = int(xs[0].shape[0]) if xs and xs[0].dim() else 0
    return result


def fuse_transformer(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    num_heads: int,
    hidden_size: int,
    model_type: str = "bert",
) -> dict[str, int]:
    """Run ONNX Runtime's transformer fusions (``onnxruntime.transformers.optimizer``:
    SkipLayerNormalization, BiasGelu, Attention, ... where its patterns match) on ``src`` and
    write the result atomically to ``dst``. Returns the count of each fused operator, so a
    caller sees which patterns matched. ORT documents running them before quantization."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # pragma: no cover - ships with onnxruntime
        raise BackendError(f"onnxruntime.transformers is not available: {_first_line(e)}") from e
    try:
        model = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size
        )
    except Exception as e:
        raise BackendError(
            f"ORT's transformer optimizer failed on {src} ({model_type}, {num_heads} heads, "
            f"hidden {hidden_size}): {_first_line(e)}"
        ) from e
    with atomic_path(dst, suffix=".onnx") as tmp:
        model.save_model_to_file(str(tmp))
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    log.info("ORT transformer fusions on %s: %s", src, fused or "none matched")
    return fused


def ort_quantize_static(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    samples: Sequence[Any],
    *,
    per_channel: bool = True,
    activation: Any = "int8",
    weight: Any = "int8",
    method: str = "minmax",
    pre_process: bool = False,
    extra_options: dict[str, Any] | None = None,
) -> Path:
    """Quantize the ONNX file ``src`` with ONNX Runtime's own ``quantize_static`` (QDQ format)
    and write it atomically to ``dst``: the peer that ``qdq`` is measured against, and a
    source of QDQ models graphopt did not write (the C backend must read them too).

    ``samples``: calibration inputs, each an array (or tensor) for the model's first input or
    a dict input name -> array. ``activation`` / ``weight``: ``"int8"``, ``"uint8"`` or an ORT
    ``QuantType``; ``method``: ``minmax``, ``percentile`` or ``entropy``; ``pre_process``
    runs ORT's ``quant_pre_process`` first, as its documentation recommends."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise BackendError(f"ort_quantize_static: method must be one of {sorted(methods)}")
    src = Path(src)
    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    feeds = [
        {k: _as_numpy(v) for k, v in s.items()} if isinstance(s, dict) else {name: _as_numpy(s)}
        for s in samples
    ]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with atomic_path(dst, suffix=".onnx") as tmp:
        model = src
        if pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            model = Path(tmp).with_name(Path(tmp).stem + ".pre.onnx")
            try:
                quant_pre_process(str(src), str(model))
            except Exception as e:  # depends on the ORT version and the model
                log.warning("quant_pre_process failed (%s); quantizing %s as is", e, src)
                model = src
        try:
            quantize_static(
                str(model),
                str(tmp),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=types.get(activation, activation),
                weight_type=types.get(weight, weight),
                calibrate_method=methods[method],
                extra_options=extra_options or {},
            )
        finally:
            if model != src:
                model.unlink(missing_ok=True)
    return Path(dst)
