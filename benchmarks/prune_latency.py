"""ORT single-thread latency of torchvision models before and after ``prune(ratio=0.5)``.

    python benchmarks/prune_latency.py [--models resnet18,mobilenet_v2] [--rounds 5] [--runs 30]

Both ONNX files are exported by graphopt (224x224, batch 1) and timed in alternating rounds
(``--rounds`` rounds of ``--runs`` runs each, after warm-up) so that drift in the machine's
load hits both alike; the table gives the median of the round medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import graphopt
from graphopt.backends import onnxruntime as ort_backend
from graphopt.table import render
from graphopt.zoo.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--pipeline", default="prune(ratio=0.5)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model, x = load_model(f"torchvision:{name}")
        before = graphopt.trace(model, x)
        after = graphopt.Pipeline.parse(args.pipeline).run(graphopt.trace(model, x)).graph
        with tempfile.TemporaryDirectory() as d:
            pb = ort_backend.export(before, Path(d) / "before.onnx")
            pa = ort_backend.export(after, Path(d) / "after.onnx")
            sb, sa = [], []
            for _ in range(args.rounds):
                sb.append(ort_backend.benchmark(pb, threads=1, runs=args.runs)["median_ms"])
                sa.append(ort_backend.benchmark(pa, threads=1, runs=args.runs)["median_ms"])
        mb, ma = statistics.median(sb), statistics.median(sa)
        cb, ca = graphopt.cost_of(before), graphopt.cost_of(after)
        rows.append(
            [
                name,
                f"{ca.macs / cb.macs:.2f}",
                f"{ca.params / cb.params:.2f}",
                f"{mb:.2f}",
                f"{ma:.2f}",
                f"{mb / ma:.2f}x",
            ]
        )
    print(
        f"pipeline: {args.pipeline}; ORT {ort_backend.ort.__version__}, 1 thread, batch 1, 224x224"
    )
    print(
        render(
            ["model", "MACs kept", "params kept", "ORT ms before", "ORT ms after", "speed-up"],
            rows,
            markdown=True,
        )
    )


if __name__ == "__main__":
    main()
