"""Trained transformers through graphopt: int8 (dynamic and static), 50% heads + FFN pruned and
distilled, evaluated in ONNX Runtime; and a trained encoder's sentence embeddings in int8.

    python benchmarks/transformer_accuracy.py [--epochs 30] [--distill-epochs 15] [--seed 0]
                                              [--importance l2,activation,taylor]
                                              [--ort-cpu EPYC-Rome]

Two models nobody here designed, built from Hugging Face configs and trained here:

- **majority**: ``BertForSequenceClassification`` (2 layers, hidden 64, 4 heads, FFN 128) on a
  synthetic sequence task: 16 tokens from a vocabulary of 6, the label is the most frequent
  token (sequences with a tie are redrawn). 6,000 training and 2,000 test sequences.
- **digits-vit**: ``ViTForImageClassification`` (8x8 images, 2x2 patches, 2 layers, hidden 64,
  4 heads) on scikit-learn's digits (1,437 train / 360 test).

For each: top-1 of the fp32 model in ORT; ``qdq(activations=dynamic)``; static ``qdq``
(calibrated on 8 training batches); ``prune(ratio=0.5,units=heads+channels)`` (half the
heads of every layer and half of every FFN, the hidden width kept) before and after
``distill(epochs=E, lr=0.001)`` on the training set; and
pruned + distilled + dynamic int8. Every row is the ONNX file graphopt writes, run in ORT.

**embedding**: the majority model's trained encoder (``BertModel``), mean-pooled over the
sequence, as a sentence-embedding model: the cosine between the fp32 embedding and the int8
one for each of the 2,000 test sequences (minimum and mean), for graphopt's dynamic int8 and
for ORT's ``quantize_dynamic`` with its defaults on the same fp32 file. With ``--ort-cpu NAME``
both int8 models also run in ORT under qemu-user emulating that x86 CPU (``EPYC-Rome``: AVX2
without VNNI, where ORT's u8 x s8 kernels can saturate; graphopt's gets ``target=avx2``).
ORT's kernels choose their code from CPUID, so the emulated outputs are that CPU's.

``--importance l2,activation,taylor`` adds the pruned rows once per importance criterion.
"""

from __future__ import annotations

import argparse
import datetime
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

BATCH = 64


def majority_data(n: int, gen: torch.Generator, seq: int = 16, vocab: int = 6):
    xs, ys = [], []
    while len(xs) < n:
        x = torch.randint(1, vocab + 1, (seq,), generator=gen)
        counts = torch.bincount(x, minlength=vocab + 1)[1:]
        if (counts == counts.max()).sum() > 1:
            continue
        xs.append(x)
        ys.append(int(counts.argmax()))
    return torch.stack(xs), torch.tensor(ys)


def models():
    import transformers as t

    bert = t.BertConfig(
        vocab_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=6,
    )
    vit = t.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return {
        "majority": lambda: t.BertForSequenceClassification(bert),
        "digits-vit": lambda: t.ViTForImageClassification(vit),
    }


def datasets(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = majority_data(6000, gen)
    x_te, y_te = majority_data(2000, gen)
    from graphopt.zoo.digits import load_digits_data

    d = load_digits_data(seed)
    return {
        "majority": (x_tr, y_tr, x_te, y_te),
        "digits-vit": (d.x_train, d.y_train, d.x_test, d.y_test),
    }


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def train(model, x, y, epochs: int, seed: int, lr: float = 2e-3) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * ((len(x) + BATCH - 1) // BATCH)
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = torch.nn.functional.cross_entropy(logits_of(model(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def ort_top1(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    sess = gort.session(path)
    correct = 0
    for i in range(0, len(x), 256):
        logits = gort.run(sess, x[i : i + 256])[0]
        correct += int((logits.argmax(-1) == y[i : i + 256].numpy()).sum())
    return correct / len(x)


def variant(model, x_tr, y_tr, pipeline: str, path: Path) -> Path:
    g = graphopt.trace(model, x_tr[:1])
    if pipeline:
        data = [(x_tr[i : i + BATCH], y_tr[i : i + BATCH]) for i in range(0, len(x_tr), BATCH)]
        graphopt.Pipeline.parse(pipeline).run(g, data=data)
    gort.export(g, path)
    return path


def embeddings(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = gort.session(path)
    out = [gort.run(sess, x[i : i + 256])[0].mean(axis=1) for i in range(0, len(x), 256)]
    return np.concatenate(out)


PRUNE = "prune(ratio=0.5,units=heads+channels{})"
"""Half the heads and half of every FFN; the hidden width stays (``units=all`` would halve it
too: the classifier reads the residual stream, so nothing locks it). ``{}``: the importance
option (``--importance``; the data criteria read the training set)."""


def prune_text(criterion: str) -> str:
    """:data:`PRUNE` with ``criterion`` as its importance (``l2``, the default, unnamed)."""
    return PRUNE.format("" if criterion == "l2" else f",importance={criterion}")


def cosine_row(label: str, c: np.ndarray) -> list[str]:
    """A row of the embedding table: the cosines' minimum, mean and share >= 0.99."""
    return [
        label,
        f"{c.min():.5f}",
        f"{statistics.mean(c.tolist()):.5f}",
        f"{(c >= 0.99).mean():.4f}",
    ]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--distill-epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="majority,digits-vit", help="which of the two to run")
    ap.add_argument("--features", default="", help='e.g. "attention,feature-loss=relation"')
    ap.add_argument(
        "--ort-cpu",
        default="",
        help="also run the embedding rows' int8 models in ORT under qemu-user emulating this x86 "
        "CPU (e.g. EPYC-Rome: AVX2 without VNNI; needs `make qemu`)",
    )
    ap.add_argument(
        "--importance",
        default="l2",
        help="prune importance criteria to compare, comma-separated (l2, activation, taylor, ...)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu = cpu_int8()
    print(f"# {datetime.date.today()} · {cpu.describe()} · torch {torch.__version__}")
    de = args.distill_epochs
    feats = f",features={args.features}" if args.features else ""
    variants = {
        "fp32": "",
        "dynamic int8": "qdq(activations=dynamic)",
        "static int8": "qdq(batches=8)",
    }
    criteria = [c for c in args.importance.split(",") if c]
    distill = f"distill(epochs={de},lr=0.001{feats})"

    def tag(c: str) -> str:  # the rows name their criterion when there is a choice
        return "" if criteria == ["l2"] else f" ({c})"

    for c in criteria:
        variants[f"pruned 50% heads+FFN{tag(c)}"] = prune_text(c)
        variants[f"pruned + distill({de}){tag(c)}"] = f"{prune_text(c)},{distill}"
    first = criteria[0]
    variants[f"pruned + distill({de}) + dynamic int8{tag(first)}"] = (
        f"{prune_text(first)},{distill},qdq(activations=dynamic)"
    )
    data = datasets(args.seed)
    rows = []
    trained = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chosen = [m for m in args.models.split(",") if m]
        for name, build in ((n, b) for n, b in models().items() if n in chosen):
            x_tr, y_tr, x_te, y_te = data[name]
            model = build()
            train(model, x_tr, y_tr, args.epochs, args.seed)
            trained[name] = model
            ref = None
            for label, pipe in variants.items():
                path = variant(model, x_tr, y_tr, pipe, tmp / f"{name}-{len(rows)}.onnx")
                top1 = ort_top1(path, x_te, y_te)
                ref = top1 if ref is None else ref
                size = path.stat().st_size / 1e3
                rows.append(
                    [name, label, f"{top1:.4f}", f"{100 * (top1 - ref):+.2f}", f"{size:.0f}"]
                )
                print(" | ".join(rows[-1]), flush=True)
        print(render(["model", "variant", "ORT top-1", "Δ points", "kB"], rows))

        if "majority" not in trained:
            return
        # sentence embeddings of the trained encoder
        from onnxruntime.quantization import quantize_dynamic

        encoder = trained["majority"].bert
        x_te = data["majority"][2]
        fp32 = variant(encoder, x_te, data["majority"][3], "", tmp / "enc.onnx")
        ours = variant(
            encoder, x_te, data["majority"][3], "qdq(activations=dynamic)", tmp / "enc-q.onnx"
        )
        theirs = tmp / "enc-ortdyn.onnx"
        quantize_dynamic(str(fp32), str(theirs))
        e32 = embeddings(fp32, x_te)
        erows = []
        for label, path in (
            ("graphopt qdq(activations=dynamic)", ours),
            ("ORT quantize_dynamic", theirs),
        ):
            erows.append(cosine_row(label, cosines(embeddings(path, x_te), e32)))
        if args.ort_cpu:  # the same two quantizers, ORT on an emulated CPU
            from quant_fidelity import emulation

            emu = emulation()
            print(f"# emulated: {emu.describe(args.ort_cpu)}")
            cpuid = emu.emulated_features(args.ort_cpu)  # what MLAS will see, not the CPU's name
            target = "vnni" if cpuid.get("AVX512VNNI") or cpuid.get("AVX_VNNI") else "avx2"
            ours_emu = variant(
                encoder,
                x_te,
                data["majority"][3],
                f"qdq(activations=dynamic,target={target})",
                tmp / "enc-q-emu.onnx",
            )
            name = gort.session(fp32).get_inputs()[0].name
            for label, path in (
                (f"graphopt qdq(activations=dynamic,target={target})", ours_emu),
                ("ORT quantize_dynamic", theirs),
            ):
                out = emu.run_ort_emulated(path, {name: x_te.numpy()}, args.ort_cpu, batch=256)
                c = cosines(out[0].mean(axis=1), e32)
                erows.append(cosine_row(f"{label}, ORT on emulated {args.ort_cpu}", c))
        print()
        print(
            render(
                ["trained encoder, mean-pooled", "min cosine", "mean cosine", "share >= 0.99"],
                erows,
            )
        )


if __name__ == "__main__":
    main()
