"""The trade-off sweep: one pipeline template run per prune ratio, measured after every lossy
stage, written as ``sweep.csv`` and ``tradeoff.png``.

For a template such as ``fold-bn,prune(ratio={ratio}),distill(epochs=3),qdq`` and each ratio,
the passes run one after another on a fresh trace; after every pass named in
:data:`VARIANT_PASSES` the graph so far is exported to ONNX and measured (params, MACs, ORT
top-1 on the test split, ORT latency). Each such point belongs to a *variant*, the names of
the lossy passes run so far (``prune``, ``prune+distill``, ``prune+distill+qdq``), which is a
line in the picture.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from graphopt.app.ort import ort_top1
from graphopt.atomic import atomic_path, write_text
from graphopt.errors import OptionError
from graphopt.table import cell, render

log = logging.getLogger(__name__)

VARIANT_PASSES = ("prune", "distill", "qdq", "sparsify")
DEFAULT_TEMPLATE = "fold-bn,prune(ratio={ratio}),distill(epochs=10),qdq"


@dataclass
class SweepPoint:
    ratio: float
    variant: str
    pipeline: str
    params: int
    macs: int
    bytes: int
    top1_ort: float
    ort_ms: float


def expand(template: str, ratio: float) -> str:
    if "{ratio}" not in template:
        raise OptionError(
            "--pipeline-template must contain {ratio}, e.g. "
            '"fold-bn,prune(ratio={ratio}),distill(epochs=3)"'
        )
    return template.replace("{ratio}", f"{ratio:g}")


def run_sweep(
    model,
    example_inputs: tuple,
    data,
    ratios: Sequence[float],
    template: str,
    *,
    threads: int = 1,
    runs: int = 50,
    progress: Callable[..., Iterable] | None = None,
) -> list[SweepPoint]:
    """Measure every (ratio, variant) point. ``data`` has ``train`` and ``test`` batch lists."""
    from graphopt.backends import onnxruntime as ort_backend
    from graphopt.cost import cost_of
    from graphopt.manager import Pipeline
    from graphopt.tracing import trace

    wrap = progress or (lambda it, desc="", total=None: it)
    pipelines = [(r, Pipeline.parse(expand(template, r))) for r in ratios]  # fail early
    points: list[SweepPoint] = []
    teacher = trace(model, example_inputs)
    with tempfile.TemporaryDirectory(prefix="graphopt-sweep-") as tmp:
        for ratio, pipeline in wrap(pipelines, desc="sweep", total=len(pipelines)):
            graph = teacher.copy()
            done: list[str] = []
            lossy: list[str] = []
            for spec in pipeline.specs:
                Pipeline([spec]).run(graph, data=data.train, teacher=teacher)
                done.append(str(spec))
                if spec.name not in VARIANT_PASSES:
                    continue
                lossy.append(spec.name)
                path = Path(tmp) / f"r{ratio:g}-{len(done)}.onnx"
                ort_backend.export(graph, path)
                top1 = ort_top1(ort_backend, path, data.test, threads)
                ms = ort_backend.benchmark(path, threads=threads, runs=runs)["median_ms"]
                cost = cost_of(graph)
                points.append(
                    SweepPoint(
                        ratio,
                        "+".join(lossy),
                        ",".join(done),
                        cost.params,
                        cost.macs,
                        cost.bytes,
                        top1,
                        ms,
                    )
                )
                log.info(
                    "sweep ratio %g %s: top-1 %.4f, %.3f ms", ratio, points[-1].variant, top1, ms
                )
    return points


def write_csv(points: Sequence[SweepPoint], path: str | Path) -> Path:
    buf = io.StringIO()
    fields = list(asdict(points[0])) if points else list(SweepPoint.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow(asdict(p))
    return write_text(path, buf.getvalue())


def plot(points: Sequence[SweepPoint], path: str | Path, title: str = "") -> Path | None:
    """Top-1 against MACs, ORT latency and model bytes, one line per variant; ``None`` (with a
    warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.warning(
            "matplotlib is not installed; tradeoff.png not written (pip install matplotlib)"
        )
        return None
    variants: dict[str, list[SweepPoint]] = {}
    for p in points:
        variants.setdefault(p.variant, []).append(p)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for name, pts in variants.items():
        pts = sorted(pts, key=lambda p: p.ratio)  # each line runs from ratio 0 upwards
        for ax, x_of in (
            (axes[0], lambda p: p.macs),
            (axes[1], lambda p: p.ort_ms),
            (axes[2], lambda p: p.bytes),
        ):
            ax.plot([x_of(p) for p in pts], [p.top1_ort for p in pts], "o-", label=name)
            for p in pts:
                ax.annotate(f"{p.ratio:g}", (x_of(p), p.top1_ort), fontsize=7, alpha=0.7)
    axes[0].xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"
        )
    )
    axes[0].set_xlabel("MACs")
    axes[1].set_xlabel("ONNX Runtime latency (ms, median)")
    axes[2].set_xlabel("model bytes (weights and buffers)")
    axes[2].xaxis.set_major_formatter(axes[0].xaxis.get_major_formatter())
    for ax in axes:
        ax.set_ylabel("top-1 (ORT, test split)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="variant (labels: prune ratio)", fontsize=8)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def table(points: Sequence[SweepPoint]) -> str:
    """One line per (ratio, variant) point."""
    head = ["ratio", "variant", "params", "MACs", "top-1 (ORT)", "ORT ms"]
    body = [
        [f"{p.ratio:g}", p.variant, cell(p.params, ","), cell(p.macs, ",")]
        + [cell(p.top1_ort, ".4f"), cell(p.ort_ms, ".3f")]
        for p in points
    ]
    return render(head, body)
