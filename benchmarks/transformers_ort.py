"""Transformers in ONNX Runtime: fp32 against graphopt's pruning and dynamic int8, and against
ORT's own ``quantize_dynamic``, on Hugging Face models built from configs (random weights).

    python benchmarks/transformers_ort.py [--models bert-base,distilbert,vit-b16] [--rounds 5]
        [--runs 20] [--prune "prune(ratio=0.5)"]

For each model (batch 1, one ORT thread): the fp32 export by graphopt, ``qdq(activations=
dynamic)`` (int8 weights per output channel, 7-bit on CPUs without VNNI, dynamically quantized
uint8 activations: ORT ``DynamicQuantizeLinear`` + ``MatMulInteger``), ORT's
``quantize_dynamic`` on the same fp32 file (its defaults), the pruned model (``--prune``,
whatever the channel analysis finds prunable: FFN channels, heads where supported) and pruned
+ dynamic int8. The files are timed in interleaved rounds (order rotating); the table gives the
median of the round medians and the speed-up over fp32. Also: the cosine between the fp32 and
each variant's mean-pooled last hidden state on ``--sentences`` random inputs (the minimum),
the kind of check a sentence-embedding user makes.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.cpu import cpu_int8
from graphopt.table import render

SEQ = 128


def configs():
    import transformers as t

    return {
        "bert-base": (t.BertModel, t.BertConfig(), "text"),
        "distilbert": (t.DistilBertModel, t.DistilBertConfig(), "text"),
        "vit-b16": (t.ViTModel, t.ViTConfig(), "image"),
        "bert-small": (
            t.BertModel,
            t.BertConfig(
                hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
            ),
            "text",
        ),  # fmt: skip
    }


def inputs_for(cfg, kind: str, seed: int, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "text":
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=gen)}
    size = cfg.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}


def embedding(path: Path, x: dict[str, torch.Tensor]) -> np.ndarray:
    out = gort.run(path, *x.values())[0]
    return out.mean(axis=1).ravel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def build(name: str, tmp: Path, prune: str, calib: int) -> tuple[dict[str, Path], dict]:
    from onnxruntime.quantization import quantize_dynamic

    cls, cfg, kind = configs()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    example = inputs_for(cfg, kind, 0)
    data = [tuple(inputs_for(cfg, kind, 100 + i, batch=4).values()) for i in range(calib)]
    graph = graphopt.trace(model, example)
    files = {"fp32": tmp / f"{name}-fp32.onnx"}
    gort.export(graph, files["fp32"])
    files["ORT quantize_dynamic"] = tmp / f"{name}-ortdyn.onnx"
    quantize_dynamic(str(files["fp32"]), str(files["ORT quantize_dynamic"]))
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.dim
    kind_name = "vit" if kind == "image" else "bert"
    files["fp32 + ORT fusions"] = tmp / f"{name}-fused.onnx"
    fused = gort.fuse_transformer(
        files["fp32"], files["fp32 + ORT fusions"], heads, hidden, kind_name
    )
    files["ORT fusions + quantize_dynamic"] = tmp / f"{name}-fused-ortdyn.onnx"
    quantize_dynamic(str(files["fp32 + ORT fusions"]), str(files["ORT fusions + quantize_dynamic"]))
    dyn = graph.copy()
    graphopt.Pipeline.parse("qdq(activations=dynamic)").run(dyn, data=data)
    files["graphopt dynamic int8"] = tmp / f"{name}-dyn.onnx"
    gort.export(dyn, files["graphopt dynamic int8"])
    files["graphopt dynamic int8 + ORT fusions"] = tmp / f"{name}-dyn-fused.onnx"
    gort.fuse_transformer(
        files["graphopt dynamic int8"], files["graphopt dynamic int8 + ORT fusions"], heads,
        hidden, kind_name,
    )  # fmt: skip
    pruned = graph.copy()
    result = graphopt.Pipeline.parse(prune).run(pruned, data=data)
    info = {"prune": result.reports[-1].details.get("summary", ""), "fused": fused}
    files["pruned"] = tmp / f"{name}-pruned.onnx"
    gort.export(pruned, files["pruned"])
    graphopt.Pipeline.parse("qdq(activations=dynamic)").run(pruned, data=data)
    files["pruned + dynamic int8"] = tmp / f"{name}-pruned-dyn.onnx"
    gort.export(pruned, files["pruned + dynamic int8"])
    info["sentences"] = [inputs_for(cfg, kind, 1000 + i) for i in range(args.sentences)]
    return files, info


def measure(files: dict[str, Path], rounds: int, runs: int) -> dict[str, float]:
    names = list(files)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            medians[n].append(gort.benchmark(files[n], threads=1, runs=runs)["median_ms"])
    return {n: statistics.median(v) for n, v in medians.items()}


def main() -> None:
    global args
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert-base,distilbert,vit-b16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--prune", default="prune(ratio=0.5)")
    p.add_argument("--calib", type=int, default=2, help="batches of 4 for calibration/importance")
    p.add_argument("--sentences", type=int, default=20)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    feats = cpu_int8().describe()
    print(f"# {feats}; ORT 1 thread, batch 1")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            files, info = build(name, Path(d), args.prune, args.calib)
            ms = measure(files, args.rounds, args.runs)
            ref = {k: [embedding(files["fp32"], x)] for k, x in enumerate(info["sentences"])}
            rows = []
            for label, path in files.items():
                cos = min(
                    cosine(ref[k][0], embedding(path, x)) for k, x in enumerate(info["sentences"])
                )
                mb = path.stat().st_size / 2**20
                rows.append(
                    [label, f"{ms[label]:.2f}", f"{ms['fp32'] / ms[label]:.2f}x", f"{mb:.1f}",
                     f"{cos:.5f}"]
                )  # fmt: skip
            print(f"\n## {name} (seq {SEQ}): {info['prune']}; ORT fusions: {info['fused']}")
            print(render(["variant", "ORT ms", "speed-up", "MB", "min cosine to fp32"], rows))


if __name__ == "__main__":
    main()
