"""Accuracy recovered after pruning digits:vgg: no training, fine-tuning, distillation.

    python benchmarks/distill.py [--ratios 0.5,0.75] [--epochs 30] [--seeds 0,1,2]

For each prune ratio the same pruned student (``fold-bn,prune(ratio=R)``) is trained with the
same epochs, data, optimizer and schedule by the ``distill`` loop in four ways: (b) fine-tuning
on labels only (``alpha=0``), (c) KD + labels (the defaults), (d) KD without labels, (e) KD +
labels + features paired automatically by provenance. (f) prunes differently: in three
rounds of increasing ratio with ``distill(epochs=E/5)`` between them
(``prune(steps=3,between=...)``), then distills as (c). The table gives test-split top-1 as
the median over seeds (the seed sets data order and initialisation of adapters), next to the
teacher and to (a) no training at all.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import graphopt
from graphopt.table import render
from graphopt.zoo.datasets import load_data
from graphopt.zoo.digits import evaluate
from graphopt.zoo.models import load_model

VARIANTS = {
    "(b) fine-tune, labels": ("alpha=0", True),
    "(c) distill, labels": ("", True),
    "(d) distill, no labels": ("", False),
    "(e) distill + features=auto": ("features=auto", True),
}


ITERATIVE = "(f) iterative prune + distill"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model("digits:vgg")
    data = load_data("digits")
    unlabelled = [x for x, _ in data.train]
    x = (data.train[0][0][:8],)
    teacher = graphopt.trace(model, x)
    teacher_top1 = evaluate(model, data.test)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        pruned = graphopt.compress(model, f"fold-bn,prune(ratio={ratio:g})", example_inputs=x).graph
        row = [f"{ratio:g}", f"{graphopt.cost_of(pruned).params:,}", f"{teacher_top1:.4f}"]
        row.append(f"{evaluate(pruned.module, data.test):.4f}")
        for extra, labelled in VARIANTS.values():
            accs, secs = [], []
            for seed in seeds:
                opts = ",".join(o for o in (f"epochs={args.epochs}", f"seed={seed}", extra) if o)
                g = pruned.copy()
                t0 = time.perf_counter()
                graphopt.Pipeline.parse(f"distill({opts})").run(
                    g, data=data.train if labelled else unlabelled, teacher=teacher
                )
                secs.append(time.perf_counter() - t0)
                accs.append(evaluate(g.module, data.test))
            row.append(f"{statistics.median(accs):.4f} ({statistics.median(secs):.1f}s)")
        accs, secs = [], []
        for seed in seeds:  # (f): prune in 3 rounds, distilling between them, then distill
            between = f'between="distill(epochs={max(1, args.epochs // 5)},seed={seed})"'
            text = (
                f"fold-bn,prune(ratio={ratio:g},steps=3,{between}),"
                f"distill(epochs={args.epochs},seed={seed})"
            )
            t0 = time.perf_counter()
            g = graphopt.compress(model, text, example_inputs=x, data=data.train).graph
            secs.append(time.perf_counter() - t0)
            accs.append(evaluate(g.module, data.test))
        row.append(f"{statistics.median(accs):.4f} ({statistics.median(secs):.1f}s)")
        rows.append(row)
    head = ["ratio", "params", "teacher", "(a) no training", *VARIANTS, ITERATIVE]
    print(
        f"digits:vgg, test split ({sum(len(y) for _, y in data.test)} images), {args.epochs} epochs, seeds {seeds}"
    )
    print(render(head, rows))


if __name__ == "__main__":
    main()
