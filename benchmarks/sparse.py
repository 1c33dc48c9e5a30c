"""Flash and accuracy of digits:vgg with unstructured sparsity, fp32 and int8, in the C backend.

    python benchmarks/sparse.py [--sparsity 0.9] [--epochs 30] [--runs 300]

Four models from the trained digits:vgg: fp32 and int8 (``qdq``), each dense and with
``sparsify(sparsity=S),distill(epochs=E)`` (masked fine-tuning). Each is exported to ONNX and
compiled to C twice: with dense weight storage (``sparse=False``) and with the backend's
choice (sparse streams where smaller). The table gives top-1 on the digits test split (ORT and
C), the whole model's constant bytes (flash) both ways, the sparse layers' bytes against their
fp32 dense bytes, and single-call C latency (median of ``--runs`` calls, -O2, ctypes) both ways.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import graphopt
from graphopt.backends import c as cbackend
from graphopt.backends import onnxruntime as ob
from graphopt.table import render
from graphopt.zoo.datasets import load_data
from graphopt.zoo.digits import evaluate
from graphopt.zoo.models import load_model


def c_top1(model, test) -> float:
    correct = seen = 0
    for x, y in test:
        for i in range(len(x)):
            correct += int(model.run(x[i : i + 1].numpy())[0].argmax() == int(y[i]))
            seen += 1
    return correct / seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model("digits:vgg")
    data = load_data("digits")
    x = (data.train[0][0][:8],)
    sp = f"sparsify(sparsity={args.sparsity:g}),distill(epochs={args.epochs})"
    variants = [
        ("fp32 dense", "fold-bn"),
        (f"fp32 {args.sparsity:.0%} sparse", f"fold-bn,{sp}"),
        ("int8 dense", "fold-bn,qdq"),
        (f"int8 {args.sparsity:.0%} sparse", f"fold-bn,{sp},qdq"),
    ]
    rows = []
    x0 = data.test[0][0][:1].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for label, text in variants:
            graph = graphopt.compress(model, text, example_inputs=x, data=data.train).graph
            path = ob.export(graph, Path(tmp) / f"{len(rows)}.onnx")
            sess = ob.session(path)
            top1_ort = evaluate(lambda a, s=sess: ob.run(s, a.numpy())[0], data.test)
            dense = cbackend.build(path, sparse=False)
            chosen = cbackend.build(path)
            layers = chosen.report["sparse_layers"]
            ratio = (
                f"1/{sum(la['weights'] * 4 for la in layers) / sum(la['bytes'] for la in layers):.1f}"
                if layers
                else "-"
            )
            times = {"dense": [], "chosen": []}
            for _ in range(5):  # alternate so drift hits both alike
                for key, m in (("dense", dense), ("chosen", chosen)):
                    times[key].append(statistics.median(m.time_run(x0, repeat=args.runs // 5)))
            rows.append(
                [
                    label,
                    f"{top1_ort:.4f}",
                    f"{c_top1(chosen, data.test):.4f}",
                    f"{dense.weight_bytes:,}",
                    f"{chosen.weight_bytes:,}",
                    f"{len(layers)}",
                    ratio,
                    f"{statistics.median(times['dense']) * 1e3:.4f}",
                    f"{statistics.median(times['chosen']) * 1e3:.4f}",
                ]
            )
            assert np.isfinite(top1_ort)
    head = [
        "model",
        "top-1 (ORT)",
        "top-1 (C)",
        "C flash, dense storage",
        "C flash, sparse storage",
        "sparse layers",
        "sparse layers vs fp32 dense",
        "C ms dense",
        "C ms sparse",
    ]
    print(f"digits:vgg, {sum(len(y) for _, y in data.test)} test images; flash = constant bytes")
    print(render(head, rows))


if __name__ == "__main__":
    main()
