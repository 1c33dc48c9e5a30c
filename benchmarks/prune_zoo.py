"""Channel pruning on the torchvision zoo: graphopt against Torch-Pruning, in the same run.

    pip install torch-pruning==1.6.1          # the peer; not a graphopt dependency
    python benchmarks/prune_zoo.py [--models resnet18,...] [--ratio 0.5] [--timeout 900]
                                   [--latency resnet18,mobilenet_v2] [--out prune_zoo.json]

Each (model, tool) runs in its own subprocess with a timeout so a hang or an
out-of-memory kill in one tool cannot take the benchmark down. Both tools get the
same model (random weights, eval mode, 224x224 input), ratio, L2 magnitude importance and
local scope; the final classifier's outputs are kept by both. "handled" means the pruned model
runs and returns logits of the original shape with fewer MACs. For graphopt the time is the
whole prune pass (analysis + scoring + surgery); for Torch-Pruning it is building the
dependency graph (MetaPruner) plus ``step()``. MACs are counted the same way for both
(``torch.utils.flop_counter`` on the pruned module). ORT latency (1 thread, median of 50 runs)
is measured for the ``--latency`` subset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _model(name: str):
    import torchvision

    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 299 if name == "inception_v3" else 224
    return m, torch.randn(1, 3, size, size)


def _macs(module, x) -> int:
    from graphopt.cost import module_macs

    return module_macs(module, (x,))[0]


def _latency(module, x) -> float:
    import graphopt
    from graphopt.backends import onnxruntime as ort_backend

    g = graphopt.trace(module, x)
    with tempfile.TemporaryDirectory() as d:
        path = ort_backend.export(g, Path(d) / "m.onnx")
        return ort_backend.benchmark(path, threads=1, runs=50)["median_ms"]


def run_graphopt(name: str, ratio: float, latency: bool) -> dict:
    import graphopt

    model, x = _model(name)
    macs0 = _macs(model, x)
    params0 = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y0 = model(x)
    g = graphopt.trace(model, x)
    pipeline = graphopt.Pipeline.parse(
        f"prune(ratio={ratio},importance=l2,scope=local)"
    )  # imports passes
    t0 = time.perf_counter()
    res = pipeline.run(g, verify=False)
    seconds = time.perf_counter() - t0
    pruned = res.graph.module
    with torch.no_grad():
        y1 = pruned(x)
    out = {
        "seconds": seconds,
        "macs0": macs0,
        "params0": params0,
        "macs": _macs(pruned, x),
        "params": sum(p.numel() for p in pruned.parameters()),
        "shape_ok": tuple(y1.shape) == tuple(y0.shape),
        "locked": len(res.reports[0].details["locked"]),
    }
    if latency:
        out["ort_ms0"] = _latency(model, x)
        out["ort_ms"] = _latency(pruned, x)
    return out


def run_torch_pruning(name: str, ratio: float, latency: bool) -> dict:
    import torch_pruning as tp

    model, x = _model(name)
    macs0 = _macs(model, x)
    params0 = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y0 = model(x)
    ignored = [  # the classifier (a Linear, or SqueezeNet's final 1x1 conv) keeps its 1000 outputs
        m
        for m in model.modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == 1000)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000)
    ]
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=False,
    )
    pruner.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        y1 = model(x)
    out = {
        "seconds": seconds,
        "macs0": macs0,
        "params0": params0,
        "macs": _macs(model, x),
        "params": sum(p.numel() for p in model.parameters()),
        "shape_ok": tuple(y1.shape) == tuple(y0.shape),
    }
    if latency:
        out["ort_ms0"] = _latency(_model(name)[0], x)
        out["ort_ms"] = _latency(model, x)
    return out


def _child(tool: str, name: str, ratio: float, latency: bool, q) -> None:
    torch.set_num_threads(1)
    try:
        fn = run_graphopt if tool == "graphopt" else run_torch_pruning
        q.put({"ok": True, **fn(name, ratio, latency)})
    except MemoryError:
        q.put({"ok": False, "error": "out of memory"})
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        q.put(
            {
                "ok": False,
                "error": f"{type(e).__name__}: {str(e)[:160]} ({Path(last.filename).name}:{last.lineno})",
            }
        )


def measure(tool: str, name: str, ratio: float, latency: bool, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(tool, name, ratio, latency, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    if not q.empty():
        r = q.get()
    else:
        r = {"ok": False, "error": f"crashed (exit code {p.exitcode}; likely out of memory)"}
    if r.get("ok"):
        r["handled"] = bool(r["shape_ok"] and r["macs"] < r["macs0"])
    else:
        r["handled"] = False
    return r


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument(
        "--latency",
        default="resnet18,mobilenet_v2,resnet50,efficientnet_b0,shufflenet_v2_x1_0,vgg11_bn",
    )
    ap.add_argument("--tools", default="graphopt,torch-pruning")
    ap.add_argument("--out", default="prune_zoo.json")
    args = ap.parse_args()
    names = (
        torchvision.models.list_models(module=torchvision.models)
        if args.models == "all"
        else args.models.split(",")
    )
    lat = set(args.latency.split(",")) if args.latency else set()
    results: dict[str, dict] = {}
    if Path(args.out).exists():
        results = json.loads(Path(args.out).read_text())  # resume
    for name in names:
        for tool in args.tools.split(","):
            key = f"{name}/{tool}"
            if key in results:
                continue
            results[key] = measure(tool, name, args.ratio, name in lat, args.timeout)
            r = results[key]
            print(
                f"{key}: {'ok' if r['handled'] else r.get('error', 'not handled')}",
                file=sys.stderr,
                flush=True,
            )
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(render(results, names, args.tools.split(","), args.ratio))


def render(results: dict, names: list[str], tools: list[str], ratio: float) -> str:
    lines = [
        f"ratio {ratio}, L2, local; torch {torch.__version__}; {platform.machine()}; 1 thread",
        "",
        "| model | graphopt | s | MACs kept | params kept | Torch-Pruning | s | MACs kept | params kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    handled = {t: 0 for t in tools}
    times = {t: [] for t in tools}
    for name in names:
        row = [name]
        for tool in tools:
            r = results.get(f"{name}/{tool}", {})
            if r.get("handled"):
                handled[tool] += 1
                times[tool].append(r["seconds"])
                row += [
                    "yes",
                    f"{r['seconds']:.2f}",
                    f"{r['macs'] / r['macs0']:.2f}",
                    f"{r['params'] / r['params0']:.2f}",
                ]
            else:
                row += [f"no: {r.get('error', 'output shape or MACs unchanged')}", "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for tool in tools:
        med = statistics.median(times[tool]) if times[tool] else float("nan")
        lines.append(
            f"- {tool}: handled {handled[tool]}/{len(names)}; median prune time {med:.2f} s"
        )
    lat_rows = [
        (n, results[f"{n}/{t}"])
        for n in names
        for t in tools
        if "ort_ms" in results.get(f"{n}/{t}", {})
    ]
    if lat_rows:
        lines += [
            "",
            "| model | tool | ORT ms before | ORT ms after | speed-up |",
            "|---|---|---|---|---|",
        ]
        for n in names:
            for t in tools:
                r = results.get(f"{n}/{t}", {})
                if "ort_ms" in r:
                    lines.append(
                        f"| {n} | {t} | {r['ort_ms0']:.2f} | {r['ort_ms']:.2f} | {r['ort_ms0'] / r['ort_ms']:.2f}x |"
                    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
