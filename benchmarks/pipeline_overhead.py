"""What a user's pruning run costs: graphopt's trace + pipeline against Torch-Pruning, cold.

    pip install torch-pruning==1.6.1     # the peer; not a graphopt dependency
    python benchmarks/pipeline_overhead.py [--models resnet50,densenet121,...] [--rounds 3]
                                           [--threads 1] [--size 224] [--export]
                                           [--torch-pruning-path DIR]

Each measurement is a fresh Python process (cold: the tool's own imports are counted; importing
torch and torchvision and building the model are not, since both tools need them). graphopt:
``import graphopt`` + ``Pipeline.parse("prune(ratio=0.5,importance=l2)")``, ``graphopt.trace``
and ``Pipeline.run`` with verification on (the default), split into import, trace, the prune
pass's analysis / scoring / surgery, verification (the reference forward plus the manager's
check after the pass) and the rest. Torch-Pruning 1.6.1: ``import torch_pruning``,
``MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[the
classifier])`` (its dependency graph) and ``step()``. Both prune 50% of the channels of every
layer group, locally, L2 magnitude, and keep the classifier's outputs. ``--export`` adds
graphopt's ONNX export time as a column (not in the total: Torch-Pruning does not export).

One untimed run of each tool comes first, so both import from bytecode caches (see
``cold_process``). Rounds alternate the two tools (graphopt first on even rounds); the table shows the median
of the rounds, and the ratio graphopt / Torch-Pruning of the median totals. Wall-clock times;
"CPU ratio" is the same ratio of the processes' CPU time (``time.process_time``), which other
jobs on a shared machine disturb less.

Python's cyclic garbage collector makes a full collection (about 0.17 s once torch is
imported: it scans every tracked object) when the objects promoted to its oldest generation
since the last one exceed a quarter of those it held then. Whichever code crosses that line
pays for all the allocations before it, so a cold run pays it or not by where the imports
and the model left the count. "full GC s" is the time each tool's run spent in full
collections; "ratio w/o full GC" compares the totals without them; "GC objects" is how many
new tracked objects each run left in the oldest generation, the share of the next full
collection it causes (one full collection per roughly 86,000).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time

from cold_process import run_worker

MODELS = ("resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0", "regnet_x_1_6gf")
PIPELINE = "prune(ratio=0.5,importance=l2)"
GO_STAGES = ("import", "trace", "analysis", "scoring", "surgery", "verification", "other")
TP_STAGES = ("import", "build", "step")


def _model(name: str, size: int, threads: int):
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, torch.randn(1, 3, size, size)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class _FullCollections:
    """Seconds Python's cyclic collector spends in full (generation 2) collections while
    installed: a gc callback."""

    def __init__(self):
        self.seconds, self._t = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self._t = time.perf_counter()
            else:
                self.seconds += time.perf_counter() - self._t


def _gc_start() -> _FullCollections:
    clock = _FullCollections()
    clock.kept_before = len(gc.get_objects(generation=2))
    gc.callbacks.append(clock)
    return clock


def _gc_stop(clock: _FullCollections) -> dict:
    """The full collections' time, and how many new GC-tracked objects the run left for the
    collector to scan from now on (after a young collection moves survivors to the old
    generation)."""
    gc.callbacks.remove(clock)
    gc.collect(1)
    return {"gc": clock.seconds, "kept": len(gc.get_objects(generation=2)) - clock.kept_before}


def worker_graphopt(name: str, size: int, threads: int, do_export: bool) -> dict:
    model, x = _model(name, size, threads)
    params0 = _params(model)
    clock = _gc_start()
    c0, t0 = time.process_time(), time.perf_counter()
    import graphopt
    from graphopt.manager import Pipeline

    pipe = Pipeline.parse(PIPELINE)
    t1 = time.perf_counter()
    graph = graphopt.trace(model, x)
    t2 = time.perf_counter()
    result = pipe.run(graph)
    t3 = time.perf_counter()
    report = result.reports[0]
    parts = report.details["seconds"]
    stages = {
        "import": t1 - t0,
        "trace": t2 - t1,
        "analysis": parts["analysis"],
        "scoring": parts["scoring"],
        "surgery": parts["surgery"],
        "verification": result.reference_seconds + report.check_seconds,
    }
    stages["other"] = (t3 - t1) - sum(v for k, v in stages.items() if k != "import")
    out = {"stages": stages, "total": t3 - t0, "cpu": time.process_time() - c0}
    out.update(_gc_stop(clock))
    out["params_kept"] = report.params / params0
    if do_export:
        import tempfile
        from pathlib import Path

        from graphopt.backends.onnxruntime import export

        with tempfile.TemporaryDirectory() as tmp:
            t4 = time.perf_counter()
            export(graph, Path(tmp) / "m.onnx")
            out["export"] = time.perf_counter() - t4
    return out


def worker_torch_pruning(name: str, size: int, threads: int) -> dict:
    model, x = _model(name, size, threads)
    params0 = _params(model)
    import torch.nn as nn

    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    clock = _gc_start()
    c0, t0 = time.process_time(), time.perf_counter()
    import torch_pruning as tp

    t1 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[classifier],
    )
    t2 = time.perf_counter()
    pruner.step()
    t3 = time.perf_counter()
    stages = {"import": t1 - t0, "build": t2 - t1, "step": t3 - t2}
    cpu = time.process_time() - c0
    out = {"stages": stages, "total": t3 - t0, "cpu": cpu, **_gc_stop(clock)}
    return {**out, "params_kept": _params(model) / params0}


def _run(tool: str, name: str, args) -> dict | None:
    argv = ["--worker", tool, "--models", name, "--size", str(args.size)]
    argv += ["--threads", str(args.threads)]
    if args.export:
        argv.append("--export")
    if args.torch_pruning_path:
        argv += ["--torch-pruning-path", args.torch_pruning_path]
    return run_worker(__file__, argv, args.timeout, f"{tool} on {name}")[0]


def _median(runs: list[dict], key: str, stage: str | None = None) -> float:
    vals = [r["stages"][stage] if stage else r[key] for r in runs]
    return statistics.median(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--export", action="store_true", help="also time graphopt's ONNX export")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--torch-pruning-path", default="", help="a directory holding torch_pruning")
    ap.add_argument("--worker", choices=("graphopt", "torch-pruning"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_pruning_path:
        sys.path.insert(0, args.torch_pruning_path)
    models = [m for m in args.models.split(",") if m]
    if args.worker:
        if args.worker == "graphopt":
            res = worker_graphopt(models[0], args.size, args.threads, args.export)
        else:
            res = worker_torch_pruning(models[0], args.size, args.threads)
        print(json.dumps(res))
        return

    import torch

    print(
        f"# {datetime.date.today()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {args.threads} thread(s) · 1x3x{args.size}x{args.size} · "
        f"{args.rounds} rounds, median"
    )
    head = ["model", "graphopt s", *GO_STAGES]
    head += ["export"] if args.export else []
    head += ["Torch-Pruning s", *(f"TP {s}" for s in TP_STAGES), "ratio", "CPU ratio"]
    head += ["full GC s go/TP", "ratio w/o full GC", "GC objects go/TP", "params kept go/TP"]
    rows, ratios, cpu_ratios, bare_ratios = [], [], [], []
    for tool in ("graphopt", "torch-pruning"):  # untimed: writes both tools' bytecode caches
        _run(tool, models[0], args)
    for name in models:
        runs: dict[str, list[dict]] = {"graphopt": [], "torch-pruning": []}
        for r in range(args.rounds):
            order = ("graphopt", "torch-pruning") if r % 2 == 0 else ("torch-pruning", "graphopt")
            for tool in order:
                res = _run(tool, name, args)
                if res is not None:
                    runs[tool].append(res)
        go, tp = runs["graphopt"], runs["torch-pruning"]
        row = [name]
        row += [f"{_median(go, 'total'):.2f}"] if go else ["failed"]
        row += [f"{_median(go, '', s):.2f}" if go else "-" for s in GO_STAGES]
        if args.export:
            row += [f"{statistics.median(r['export'] for r in go):.2f}" if go else "-"]
        row += [f"{_median(tp, 'total'):.2f}"] if tp else ["-"]
        row += [f"{_median(tp, '', s):.2f}" if tp else "-" for s in TP_STAGES]
        if go and tp:
            ratio = _median(go, "total") / _median(tp, "total")
            cpu_ratio = _median(go, "cpu") / _median(tp, "cpu")
            bare = statistics.median(r["total"] - r["gc"] for r in go) / statistics.median(
                r["total"] - r["gc"] for r in tp
            )
            ratios.append(ratio)
            cpu_ratios.append(cpu_ratio)
            bare_ratios.append(bare)
            row += [f"{ratio:.2f}", f"{cpu_ratio:.2f}"]
            row += [f"{_median(go, 'gc'):.2f} / {_median(tp, 'gc'):.2f}", f"{bare:.2f}"]
            row += [f"{_median(go, 'kept'):.0f} / {_median(tp, 'kept'):.0f}"]
            row += [f"{go[0]['params_kept']:.3f} / {tp[0]['params_kept']:.3f}"]
        else:
            row += ["-"] * 6
        rows.append(row)
        print(" | ".join(row), file=sys.stderr)
    from graphopt.table import render

    print(render(head, rows))
    if ratios:
        print(f"\nmedian ratio graphopt / Torch-Pruning: {statistics.median(ratios):.2f}")
        print(f"median CPU-time ratio: {statistics.median(cpu_ratios):.2f}")
        print(f"median ratio without full collections: {statistics.median(bare_ratios):.2f}")


if __name__ == "__main__":
    main()
