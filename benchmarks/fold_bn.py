"""Trace + fold-bn time and latency before/after fold-bn, in PyTorch and ONNX Runtime.

    python benchmarks/fold_bn.py [--models resnet18,mobilenet_v2,digits:vgg] [--repeats 5]

Prints a Markdown table (median of ``--repeats`` runs for the graphopt timings; latency is
the median over many single-thread runs after warm-up). Ratios are after/before.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.backends import onnxruntime as ort_backend
from graphopt.table import render
from graphopt.zoo.models import load_model


def _spec(name: str) -> str:
    return name if ":" in name else f"torchvision:{name}"


def bench_model(name: str, repeats: int, runs: int) -> list[str]:
    model, inputs = load_model(_spec(name))
    trace_s, fold_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = graphopt.trace(model, inputs)
        t1 = time.perf_counter()
        result = graphopt.Pipeline.parse("fold-bn,dce").run(graph, verify=False)
        t2 = time.perf_counter()
        trace_s.append(t1 - t0)
        fold_s.append(t2 - t1)
    before = graphopt.trace(model, inputs)
    after = result.graph
    folded = len(result.reports[0].details["folded"])
    tb = ort_backend.torch_benchmark(before.module, inputs, threads=1, runs=runs)
    ta = ort_backend.torch_benchmark(after.module, inputs, threads=1, runs=runs)
    with tempfile.TemporaryDirectory() as d:
        pb = ort_backend.export(before, Path(d) / "before.onnx")
        pa = ort_backend.export(after, Path(d) / "after.onnx")
        ob = ort_backend.benchmark(pb, threads=1, runs=runs)
        oa = ort_backend.benchmark(pa, threads=1, runs=runs)
    return [
        name,
        "x".join(map(str, inputs[0].shape)),
        str(folded),
        f"{statistics.median(trace_s) * 1000:.0f}",
        f"{statistics.median(fold_s) * 1000:.0f}",
        f"{tb['median_ms']:.2f}",
        f"{ta['median_ms']:.2f}",
        f"{ta['median_ms'] / tb['median_ms']:.2f}",
        f"{ob['median_ms']:.2f}",
        f"{oa['median_ms']:.2f}",
        f"{oa['median_ms'] / ob['median_ms']:.2f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,digits:vgg")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [bench_model(m, args.repeats, args.runs) for m in args.models.split(",")]
    head = [
        "model",
        "input",
        "BNs folded",
        "trace ms",
        "fold-bn+dce ms",
        "torch ms before",
        "torch ms after",
        "ratio",
        "ORT ms before",
        "ORT ms after",
        "ratio",
    ]
    print(
        f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"torch {torch.__version__}, 1 thread"
    )
    print(render(head, rows, markdown=True))


if __name__ == "__main__":
    main()
