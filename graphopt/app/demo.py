"""The end-to-end demo: digits:vgg through fold-bn, prune, distill and qdq, each stage lowered
to ONNX Runtime and to C, measured on the whole digits test split.

Every stage writes its outputs into the output directory as soon as it is measured
(``stages/<i>-<stage>.onnx``, ``c/<i>-<stage>/`` with the C sources and the compiled library),
each file atomically; ``report.json`` and ``table.md`` are rewritten after every stage. A
failing stage raises :class:`DemoStageError` naming the stage and the outputs that are still
valid; nothing written before it is lost.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.app.ort import ort_top1
from graphopt.atomic import write_json, write_text
from graphopt.errors import GraphoptError
from graphopt.table import cell, render

log = logging.getLogger(__name__)

MODEL = "digits:vgg"
OUT = "graphopt-demo"  # the default output directory
RATIO = 0.5
EPOCHS = 30


def stages(ratio: float = RATIO, epochs: int = EPOCHS) -> list[tuple[str, str]]:
    """``(row label, pipeline text)`` per stage after the original, applied one after another."""
    return [
        ("folded", "fold-bn,remove-identity,dce"),
        ("pruned", f"prune(ratio={ratio:g})"),
        ("distilled", f"distill(epochs={epochs})"),
        ("quantized", "qdq"),
    ]


class DemoStageError(GraphoptError):
    """A demo stage failed; names the stage and the outputs written before it (still valid)."""

    def __init__(self, stage: str, cause: BaseException, valid: list[str]):
        kept = ", ".join(valid) if valid else "none"
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        first = lines[0] + (" ..." if len(lines) > 1 else "")
        super().__init__(f"demo stage {stage!r} failed: {first}; outputs still valid: {kept}")
        self.stage = stage
        self.valid = valid


@dataclass
class DemoConfig:
    out: Path
    ratio: float = RATIO
    epochs: int = EPOCHS
    threads: int = 1
    runs: int = 200
    cc: str | None = None
    c: bool = True


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    n_test: int = 0

    @property
    def pipeline(self) -> str:
        return ",".join(r["pipeline"] for r in self.rows if r["pipeline"])


def _c_measure(onnx_path: Path, c_dir: Path, test, runs: int, cc: str | None) -> dict[str, Any]:
    """Build the C for ``onnx_path`` into ``c_dir``; top-1 over ``test`` one image at a time
    (the C model has batch 1) and the median latency of ``runs`` calls."""
    from graphopt.backends import c as cbackend

    model = cbackend.build(onnx_path, cc=cc, flags=("-O2",), out_dir=c_dir)
    correct = seen = 0
    for x, y in test:
        for i in range(len(x)):
            (logits,) = model.run(x[i : i + 1].numpy())
            correct += int(np.argmax(logits.reshape(-1)) == int(y[i]))
            seen += 1
    x0 = test[0][0][:1].numpy()
    model.time_run(x0, repeat=20)
    times = model.time_run(x0, repeat=runs)
    return {
        "top1_c": correct / seen,
        "c_ms": statistics.median(times) * 1000,
        "c_weight_bytes": model.weight_bytes,
        "c_arena_bytes": model.arena_bytes,
        "c_dir": str(c_dir),
    }


def _measure(label, pipeline, graph, index, cfg: DemoConfig, test, result: DemoResult):
    from graphopt.backends import onnxruntime as ort_backend
    from graphopt.cost import cost_of
    from graphopt.zoo.digits import evaluate

    stem = f"{index}-{label}"
    onnx_path = cfg.out / "stages" / f"{stem}.onnx"
    ort_backend.export(graph, onnx_path)
    result.written.append(str(onnx_path.relative_to(cfg.out)))
    row: dict[str, Any] = {
        "stage": label,
        "pipeline": pipeline,
        "cost": cost_of(graph).to_dict(),
        "top1_torch": evaluate(graph.module, test),
        "top1_ort": ort_top1(ort_backend, onnx_path, test, cfg.threads),
        "ort_ms": ort_backend.benchmark(
            onnx_path, threads=cfg.threads, inputs=graph.example_inputs, warmup=20, runs=cfg.runs
        )["median_ms"],
        "onnx": str(onnx_path.relative_to(cfg.out)),
    }
    if cfg.c:
        c_dir = cfg.out / "c" / stem
        shutil.rmtree(c_dir, ignore_errors=True)
        from graphopt.backends.c import UnsupportedError

        try:
            row.update(_c_measure(onnx_path, c_dir, test, cfg.runs, cfg.cc))
        except UnsupportedError as e:  # ops the C backend does not lower yet: no C columns
            shutil.rmtree(c_dir, ignore_errors=True)
            row["c_unsupported"] = str(e).splitlines()[0]
            log.warning("demo: no C for the %s stage: %s", label, row["c_unsupported"])
        except GraphoptError:
            shutil.rmtree(c_dir, ignore_errors=True)
            raise
        else:
            row["c_dir"] = str(c_dir.relative_to(cfg.out))
            result.written.append(row["c_dir"] + "/")
    result.rows.append(row)


def run_demo(cfg: DemoConfig, progress: Callable[..., Iterable] | None = None) -> DemoResult:
    """Run every stage, writing outputs as it goes; see the module docstring."""
    from graphopt.manager import Pipeline
    from graphopt.tracing import trace
    from graphopt.zoo.digits import INPUT_SHAPE, load_digits_data, pretrained_vgg
    from graphopt.zoo.models import example_inputs

    cfg.out.mkdir(parents=True, exist_ok=True)
    wrap = progress or (lambda it, desc="", total=None: it)
    teacher = pretrained_vgg(progress=progress)
    digits = load_digits_data()
    train, test = digits.batches("train"), digits.batches("test")
    graph = trace(teacher, example_inputs(INPUT_SHAPE))
    original = graph.copy()
    result = DemoResult(n_test=len(digits.y_test))
    plan = [
        ("original", "", None),
        *[(lab, text, Pipeline.parse(text)) for lab, text in stages(cfg.ratio, cfg.epochs)],
    ]
    for index, (label, text, pipeline) in enumerate(wrap(plan, desc="demo", total=len(plan))):
        try:
            if pipeline is not None:
                res = pipeline.run(graph, data=train, teacher=original, progress=progress)
                graph = res.graph
            _measure(label, text, graph, index, cfg, test, result)
            if pipeline is not None:
                result.rows[-1]["passes"] = res.to_dict()["passes"]
        except Exception as e:
            _write_summary(cfg, result, failed=label)
            raise DemoStageError(label, e, result.written) from e
        _write_summary(cfg, result)
    final = cfg.out / result.rows[-1]["onnx"]
    shutil.copyfile(final, cfg.out / ".model.onnx.tmp")
    (cfg.out / ".model.onnx.tmp").replace(cfg.out / "model.onnx")
    result.written.insert(0, "model.onnx")
    _write_summary(cfg, result)
    return result


def _write_summary(cfg: DemoConfig, result: DemoResult, failed: str | None = None) -> None:
    report = {
        "command": "demo",
        "model": MODEL,
        "pipeline": result.pipeline,
        "ratio": cfg.ratio,
        "epochs": cfg.epochs,
        "threads": cfg.threads,
        "stages": result.rows,
        "failed_stage": failed,
        "outputs": result.written,
    }
    write_json(cfg.out / "report.json", report)
    write_text(cfg.out / "table.md", table(result.rows, markdown=True) + "\n")
    for name in ("report.json", "table.md"):
        if name not in result.written:
            result.written.append(name)


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """One line per stage: cost, top-1 and median latency in ONNX Runtime and in C."""
    head = ["stage", "params", "MACs", "bytes", "top-1 (ORT)", "top-1 (C)", "ORT ms", "C ms"]
    body = [
        [r["stage"], *(cell(r["cost"][k], ",") for k in ("params", "macs", "bytes"))]
        + [cell(r.get(k), ".4f") for k in ("top1_ort", "top1_c", "ort_ms", "c_ms")]
        for r in rows
    ]
    return render(head, body, markdown=markdown)
