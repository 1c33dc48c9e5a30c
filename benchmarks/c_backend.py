"""The C backend against ONNX Runtime: flash, RAM, compile time and single-thread latency.

    python benchmarks/c_backend.py [--models digits:vgg,resnet18,mobilenet_v2]
                                   [--shape 1,3,64,64] [--runs 200] [--rounds 5] [--simd]
                                   [--kinds float,int8]

For each model, float and int8 (ORT ``quantize_static``: QDQ, per-channel int8 weights, int8
activations, 32 calibration inputs: the digits training split for digits:vgg, random normal
inputs otherwise): weight bytes (flash), arena bytes against the lower bound, the time to
emit and to compile the C with ``cc -O3 -march=native`` (``--simd`` adds ``-DGP_SIMD``: the
int8 kernels' optional AVX2 intrinsics; weights and code compiled in parallel), and the latency of the C against ORT with one thread, measured in the same run:
``--rounds`` rounds of ``--runs`` calls each, alternating C and ORT, the median of the round
medians. Parity is printed alongside (float: max |C - ORT| over the output range; int8: share
of outputs within one quantization step of ORT's).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import graphopt
from graphopt.backends.c import build
from graphopt.backends.c.build import compiler_version, find_compiler
from graphopt.backends.onnxruntime import export, ort_quantize_static
from graphopt.cpu import cpu_int8
from graphopt.table import render
from graphopt.zoo.models import load_model

FLAGS = ("-O3", "-march=native")


def _spec(name: str) -> str:
    return name if ":" in name else f"torchvision:{name}"


def _export(name: str, shape, root: Path) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    model, (x,) = load_model(_spec(name), input_shape=None if name.startswith("digits") else shape)
    path = root / (name.replace(":", "_") + ".onnx")
    export(graphopt.trace(model, (x,)), path, dynamic_batch=False)
    if name.startswith("digits"):
        from graphopt.zoo.digits import load_digits_data

        xs = load_digits_data().x_train.numpy()[:32]
        calib = [xs[i : i + 1] for i in range(len(xs))]
    else:
        rng = np.random.default_rng(0)
        calib = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(32)]
    return path, x.numpy(), calib


def _quantize(src: Path, calib: list[np.ndarray]) -> Path:
    """ORT's quantize_static: QDQ, per-channel int8 weights, int8 activations."""
    return ort_quantize_static(src, src.with_name(src.stem + "_int8.onnx"), calib)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _latency(cm, sess, x, runs: int, rounds: int) -> tuple[float, float]:
    feed = {sess.get_inputs()[0].name: x}
    cm.time_run(x, repeat=10)
    for _ in range(10):
        sess.run(None, feed)
    c_med, o_med = [], []
    for _ in range(rounds):
        c_med.append(statistics.median(cm.time_run(x, repeat=runs)))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        o_med.append(statistics.median(times))
    return statistics.median(c_med) * 1e3, statistics.median(o_med) * 1e3


def _parity(path: Path, cm, sess, x, int8: bool) -> str:
    (got,) = cm.run(x)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if not int8:
        return f"{np.abs(got - ref).max() / (ref.max() - ref.min()):.1e} of range"
    model = onnx.load(str(path))
    last = [n for n in model.graph.node if n.output[0] == model.graph.output[0].name][0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    step = float(inits[last.input[1]]) if last.op_type == "DequantizeLinear" else 1.0
    return f"{(np.abs(got - ref) / step <= 1.001).mean():.1%} within 1 step"


def bench(path: Path, x: np.ndarray, label: str, int8: bool, runs: int, rounds: int, flags):
    t0 = time.perf_counter()
    cm = build(path, flags=flags)
    total = time.perf_counter() - t0
    sess = _session(path)
    c_ms, o_ms = _latency(cm, sess, x, runs, rounds)
    ops = cm.report["op_counts"]
    n_int = sum(v for k, v in ops.items() if k.endswith("_i8"))
    return [
        label,
        "int8" if int8 else "float",
        f"{cm.weight_bytes:,}",
        f"{cm.arena_bytes:,}",
        f"{cm.arena_lower_bound_bytes:,}",
        f"{cm.arena_bytes / cm.arena_lower_bound_bytes:.3f}",
        f"{total - cm.compile_seconds:.1f}",
        f"{cm.compile_seconds:.1f}",
        f"{c_ms:.3f}",
        f"{o_ms:.3f}",
        f"{c_ms / o_ms:.2f}x",
        _parity(path, cm, sess, x, int8) + (f"; {n_int} int kernels" if int8 else ""),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits:vgg,resnet18,mobilenet_v2")
    ap.add_argument("--shape", default="1,3,64,64", help="input shape of torchvision models")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--simd", action="store_true", help="compile with -DGP_SIMD (AVX2 paths)")
    ap.add_argument(
        "--kinds", default="float,int8", help="which builds to measure: float, int8 or both"
    )
    args = ap.parse_args(argv)
    flags = (*FLAGS, "-DGP_SIMD") if args.simd else FLAGS
    shape = tuple(int(d) for d in args.shape.split(","))
    kinds = set(args.kinds.split(","))
    if not kinds or not kinds <= {"float", "int8"}:
        ap.error(f"--kinds: float and/or int8, not {args.kinds!r}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            path, x, calib = _export(name, shape, Path(d))
            label = name if name.startswith("digits") else f"{name} {'x'.join(map(str, shape))}"
            if "float" in kinds:
                rows.append(bench(path, x, label, False, args.runs, args.rounds, flags))
            if "int8" in kinds:
                qpath = _quantize(path, calib)
                rows.append(bench(qpath, x, label, True, args.runs, args.rounds, flags))
    head = [
        "model",
        "kind",
        "weights B",
        "arena B",
        "lower bound B",
        "arena/LB",
        "emit s",
        "cc s",
        "C ms",
        "ORT ms",
        "C/ORT",
        "parity",
    ]
    cc = find_compiler()
    print(
        f"{datetime.date.today()}, {cpu_int8().describe()}, {cc} {' '.join(flags)} "
        f"({compiler_version(cc)}), onnxruntime {ort.__version__}, "
        f"{args.rounds} rounds x {args.runs} runs, one thread\n"
    )
    print(render(head, rows, markdown=True))


if __name__ == "__main__":
    main()
