"""The pass manager: a parsed pipeline that runs passes, verifies between them and reports.

Between passes (when a pass says it modified the graph): ``graph.lint()``, recompile, shape
propagation, and a numeric check on a fixed batch. An **exact** pass must keep every output
within ``max|a-b| <= atol + rtol*max|b|`` of the outputs before it, else a
:class:`VerificationError` names the pass and the first diverging node; a **lossy** pass gets
drift metrics against the previous stage and against the traced model. A pass that raises is
re-raised as :class:`PassFailure` naming the pass and the pipeline so far; with a dump
directory a reproducer (graph before the pass, inputs, pipeline text) is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .atomic import write_text
from .data import first_batch, prepare
from .errors import (
    DataError,
    GraphoptError,
    OptionError,
    PassContractError,
    PassFailure,
    VerificationError,
)
from .graph import PIPELINE_META, Graph, code_state, detach_outputs, node_meta
from .instruments import DumpDir, Instrument, Timing
from .metrics import drift, within
from .options import build_options, fields_of, format_value, text_name
from .pass_api import Pass, PassContext, PassReport, PassResult, nested_pipelines
from .pipeline_text import parse_items
from .registry import REGISTRY, Registry

log = logging.getLogger(__name__)


@dataclass
class PassSpec:
    """One pipeline entry: the pass class, its typed options and which options were written."""

    cls: type[Pass]
    options: Any
    given: tuple[str, ...] = ()
    nested: list[Pipeline] = field(default_factory=list, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.cls.name

    def __str__(self) -> str:
        if not self.given:
            return self.name
        parts = [f"{text_name(k)}={format_value(getattr(self.options, k))}" for k in self.given]
        return f"{self.name}({','.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassSpec) and str(self) == str(other)

    def instantiate(self) -> Pass:
        return self.cls(self.options)

    def trains(self) -> bool:
        """The pass, or a pipeline nested in its options, trains the weights."""
        return self.cls.trains(self.options) or any(
            s.trains() for p in self.nested for s in p.specs
        )

    def uses_data(self) -> bool:
        """The pass, or a pipeline nested in its options, cannot run without data."""
        return self.cls.uses_data(self.options) or any(p.uses_data() for p in self.nested)

    def uses_teacher(self) -> bool:
        return self.cls.uses_teacher(self.options) or any(p.uses_teacher() for p in self.nested)


def _nested(pcls: type[Pass], options: Any, reg: Registry) -> list[Pipeline]:
    """Parse the nested pipeline texts in ``options`` (names checked against ``reg``)."""
    out = []
    for fname, text in nested_pipelines(options):
        try:
            out.append(Pipeline.parse(text, reg))
        except GraphoptError as e:
            raise OptionError(f"{pcls.name}: {text_name(fname)}={text!r}: {e}") from e
    return out


@dataclass
class PipelineResult:
    graph: Graph
    pipeline: str
    reports: list[PassReport]
    seconds: float
    reference_seconds: float = 0.0  # the verification's forward on the model as given

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seconds": self.seconds,
            "reference_seconds": self.reference_seconds,
            "passes": [r.to_dict() for r in self.reports],
        }

    def summary(self) -> str:
        """A readable table: one row per pass."""
        from .table import render

        rows = []
        for r in self.reports:
            d = r.drift
            rows.append(
                [
                    str(r.index),
                    r.spec,
                    "exact" if r.exact else "lossy",
                    "yes" if r.modified else "no",
                    f"{r.seconds * 1000:.0f}",
                    f"{r.params:,}",
                    f"{d['max_abs']:.2e}" if "max_abs" in d else "-",
                    f"{d['cosine']:.5f}" if "cosine" in d else "-",
                    f"{d['top1']:.3f}" if "top1" in d else "-",
                    r.summary,
                ]
            )
        head = ["#", "pass", "kind", "changed", "ms", "params", "max|Δ|", "cosine", "top-1", "what"]
        return render(head, rows)


def _count_params(module: torch.nn.Module) -> int:
    """Parameters plus quantized weight storage, counted as :func:`graphopt.cost.cost_of` does."""
    from .cost import _storage

    return _storage(module, recurse=True)[0]


class Pipeline:
    """An ordered list of :class:`PassSpec`. ``Pipeline.parse(text)``; ``str(p)`` prints it."""

    def __init__(self, specs: Sequence[PassSpec], registry: Registry | None = None):
        self.specs = list(specs)
        self._registry = registry or REGISTRY

    @classmethod
    def parse(cls, text: str, registry: Registry | None = None) -> Pipeline:
        reg = registry or REGISTRY
        specs = []
        for item in parse_items(text):
            pcls = reg.get(item.name)
            options = build_options(item.name, pcls.Options, item.options)
            names = {text_name(f.name): f.name for f in fields_of(pcls.Options)}
            given = tuple(names.get(k, names.get(text_name(k), k)) for k in item.options)
            specs.append(PassSpec(pcls, options, given, _nested(pcls, options, reg)))
        return cls(specs, reg)

    @classmethod
    def of(cls, *passes: Pass | type[Pass]) -> Pipeline:
        """A pipeline from pass instances or classes (options given in Python)."""
        specs = []
        for p in passes:
            inst = p() if isinstance(p, type) else p
            defaults = type(inst).Options()
            given = tuple(
                f.name
                for f in fields_of(type(inst).Options)
                if getattr(inst.options, f.name) != getattr(defaults, f.name)
            )
            specs.append(
                PassSpec(
                    type(inst), inst.options, given, _nested(type(inst), inst.options, REGISTRY)
                )
            )
        return cls(specs)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.specs)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and str(self) == str(other)

    def __len__(self) -> int:
        return len(self.specs)

    def uses_data(self) -> bool:
        return any(s.uses_data() for s in self.specs)

    def uses_teacher(self) -> bool:
        return any(s.uses_teacher() for s in self.specs)

    # -- running --------------------------------------------------------------------------------
    def _warn_about_effects(self) -> None:
        """Warn about a pipeline that cannot do what it says: no passes at all, or a pass
        whose effect needs training that no later pass does."""
        if not self.specs:
            log.warning("the pipeline is empty: the model is left as traced")
        for i, spec in enumerate(self.specs):
            why = spec.cls.needs_training_after(spec.options)
            if why and not any(later.trains() for later in self.specs[i + 1 :]):
                log.warning("%s: %s, and no pass after it trains, so it changes nothing", spec, why)

    def run(
        self,
        graph: Graph,
        data: Any = None,
        *,
        instruments: Iterable[Instrument] = (),
        teacher: Graph | None = None,
        out_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        dump_dir: str | Path | None = None,
        verify: bool = True,
        rtol: float = 1e-4,
        atol: float = 1e-6,
        progress=None,
        seed: int = 0,
        record: bool = True,
    ) -> PipelineResult:
        """Run every pass on ``graph`` (in place) and return the result with per-pass reports.

        ``record`` appends this pipeline's text to ``graph.module.meta["graphopt.pipeline"]``
        (the ONNX export stores it); nested pipelines run with ``record=False``."""
        if not isinstance(graph, Graph):
            raise TypeError(
                f"Pipeline.run expects a graphopt.Graph, got {type(graph).__name__}; "
                "use graphopt.trace(model, example_inputs) or graphopt.compress(...)"
            )
        data = prepare(data)
        self._warn_about_effects()
        for spec in self.specs:
            if spec.uses_data() and data is None:
                raise DataError(
                    f"pass {spec.name!r} needs data: pass data=batches (an iterable of inputs or "
                    "(inputs, labels) tuples) to run()/compress(), or --data NAME on the CLI"
                )
        timing = Timing()
        instr: list[Instrument] = [timing, *instruments]
        dump = DumpDir(dump_dir) if dump_dir is not None else None
        if dump is not None:
            instr.append(dump)
        snapshot = graph.copy() if teacher is None and self.uses_teacher() else None
        ctx = PassContext(
            data=data,
            teacher_factory=(lambda: teacher) if teacher is not None else (lambda: snapshot),
            out_dir=Path(out_dir) if out_dir is not None else None,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            seed=seed,
        )
        if progress is not None:
            ctx.progress = progress

        def nested(text: str, g: Graph) -> PipelineResult:
            return Pipeline.parse(text, self._registry).run(
                g,
                data=data,
                teacher=ctx.teacher,
                out_dir=ctx.out_dir,
                checkpoint_dir=ctx.checkpoint_dir,
                verify=False,
                progress=ctx.progress,
                seed=seed,
                record=False,
            )

        ctx.nested = nested

        ref_inputs = graph.example_inputs
        batch = first_batch(data) if data is not None else None
        if batch is not None:
            ref_inputs = tuple(t[:64] for t in batch)
        t_ref = time.perf_counter()
        original_out = None
        if verify and ref_inputs is graph.example_inputs:
            original_out = graph.example_outputs()  # the trace's shape propagation ran it
        if verify and original_out is None:
            original_out = _forward(graph, ref_inputs)
        reference_seconds = time.perf_counter() - t_ref
        if verify and not _all_finite(original_out):
            raise DataError(_nonfinite_message(graph, ref_inputs))
        prev_out = original_out
        reports: list[PassReport] = []
        t_start = time.perf_counter()
        for index, spec in enumerate(self.specs, start=1):
            p = spec.instantiate()
            before = graph.copy() if (verify and p.exact) or dump is not None else None
            for ins in instr:
                ins.before_pass(p, graph, index - 1)
            graph.compiled_state = code_state(graph.module.graph)  # the code is current here
            t0 = time.perf_counter()
            try:
                result = p.run(graph, ctx)
                if not isinstance(result, PassResult):
                    raise PassContractError(
                        f"pass {p.name!r} returned {type(result).__name__}, not a PassResult; "
                        "return PassResult(modified=..., report=...)"
                    )
            except Exception as e:
                graph.compiled_state = None
                for ins in instr:
                    ins.on_failure(p, graph, index, e)
                so_far = ",".join(str(s) for s in self.specs[:index])
                repro = _write_reproducer(dump, before, so_far, ref_inputs) if dump else None
                if isinstance(e, GraphoptError) and not isinstance(e, PassContractError):
                    msg = f"pass {p.name!r} failed: {e}"
                else:
                    msg = f"pass {p.name!r} failed: {type(e).__name__}: {e}"
                msg += f" (pipeline so far: {so_far})"
                if repro:
                    msg += f"; reproducer written to {repro}"
                raise PassFailure(msg, p.name, so_far, repro) from e
            seconds = time.perf_counter() - t0
            report = PassReport(
                index=index,
                name=p.name,
                spec=str(spec),
                exact=p.exact,
                modified=result.modified,
                seconds=seconds,
                details=result.report,
            )
            t_check = time.perf_counter()
            # the code is current if the graph is as it was before the pass or at its last
            # Graph.recompile() inside the pass (a pass that changed only parameters, or that
            # recompiled itself)
            current = code_state(graph.module.graph) == graph.compiled_state
            graph.compiled_state = None
            if not result.modified and not current:
                log.warning("pass %r changed the graph but reported no change", p.name)
                graph.recompile()
            if result.modified:
                graph.invalidate()
                try:
                    example_out = _check_structure(graph, p, recompile=not current)
                    if verify:
                        # the shape propagation just ran the example inputs: reuse its outputs
                        if ref_inputs is graph.example_inputs:
                            out = detach_outputs(example_out)
                        else:
                            out = _forward(graph, ref_inputs)
                        if p.exact:
                            if not within(out, prev_out, rtol, atol):
                                raise _divergence(
                                    p, before, graph, ref_inputs, rtol, atol, out, prev_out
                                )
                            report.verified = True
                        report.drift = drift(out, prev_out)
                        report.drift_total = drift(out, original_out)
                        prev_out = out
                except VerificationError as e:
                    so_far = ",".join(str(s) for s in self.specs[:index])
                    repro = _write_reproducer(dump, before, so_far, ref_inputs) if dump else None
                    e.args = (
                        f"{e} (pipeline so far: {so_far})"
                        + (f"; reproducer written to {repro}" if repro else ""),
                    )
                    raise
            report.check_seconds = time.perf_counter() - t_check
            report.params = _count_params(graph.module)
            for ins in instr:
                ins.after_pass(p, graph, report)
            report.seconds = next(
                (t for i, _, t in reversed(timing.timings) if i == index), seconds
            )
            reports.append(report)
            log.info("pass %s: %s (%.3fs)", report.spec, report.summary or "done", report.seconds)
        done = str(self)
        if record and self.specs:
            before = graph.module.meta.get(PIPELINE_META)
            graph.module.meta[PIPELINE_META] = f"{before},{done}" if before else done
        return PipelineResult(
            graph, done, reports, time.perf_counter() - t_start, reference_seconds
        )


def _forward(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = graph.module(*inputs)
    return detach_outputs(out)


def _check_structure(graph: Graph, p: Pass, recompile: bool = True) -> Any:
    """Lint, recompile (unless ``p`` left the code as it was) and propagate shapes after
    ``p``; returns the outputs on the example inputs (from the propagation)."""
    try:
        if recompile:
            graph.recompile()
        else:
            graph.module.graph.lint()
    except Exception as e:
        raise VerificationError(
            f"pass {p.name!r} left an invalid graph: {e}", pass_name=p.name
        ) from e
    try:
        return graph.propagate_shapes()
    except GraphoptError as e:
        raise VerificationError(
            f"pass {p.name!r} left a graph that no longer runs: {e}", pass_name=p.name
        ) from e


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if isinstance(v, torch.Tensor):
            self.values[n.name] = v.detach()
        return v


def _record(graph: Graph, inputs) -> dict[str, Any]:
    rec = _Recorder(graph.module)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rec.run(*inputs)
    return rec.values


def _all_finite(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, (list, tuple)):
        return all(_all_finite(o) for o in out)
    if isinstance(out, dict):
        return all(_all_finite(o) for o in out.values())
    return True


def _nonfinite_message(graph: Graph, inputs) -> str:
    """Which node of the model as given first computes NaN/Inf, before any pass ran."""
    if not all(_all_finite(t) for t in inputs):
        return "the verification batch holds NaN/Inf: clean the data before compressing"
    values = _record(graph, inputs)
    for n in graph.module.graph.nodes:
        v = values.get(n.name)
        if v is not None and not _all_finite(v):
            meta = node_meta(n)
            where = f" (module {meta.module_path!r})" if meta.module_path else ""
            params = ""
            if n.op == "call_module":
                bad = [
                    k
                    for k, p in graph.module.get_submodule(str(n.target)).named_parameters()
                    if not bool(torch.isfinite(p).all())
                ]
                params = f"; its parameters {', '.join(bad)} hold NaN/Inf" if bad else ""
            return (
                f"the model as given computes NaN/Inf before any pass ran: first at node "
                f"{n.name!r}{where}{params}; fix the model or its weights"
            )
    return "the model as given computes NaN/Inf before any pass ran"


def first_divergence(
    before: Graph, after: Graph, inputs, rtol: float, atol: float
) -> fx.Node | None:
    """The first node of ``after`` (in order) whose value differs from the same-named node of
    ``before`` beyond tolerance, or ``None``."""
    old = _record(before, inputs)
    new = _record(after, inputs)
    for n in after.module.graph.nodes:
        a, b = new.get(n.name), old.get(n.name)
        if a is None or b is None or a.shape != b.shape:
            continue
        if not within(a, b, rtol, atol):
            return n
    return None


def _divergence(p, before, graph, inputs, rtol, atol, out, prev_out) -> VerificationError:
    d = drift(out, prev_out)
    node = first_divergence(before, graph, inputs, rtol, atol) if before is not None else None
    where = ""
    if node is not None:
        path = node_meta(node).module_path
        where = f"; first diverging node {node.name!r}" + (f" (module {path!r})" if path else "")
    return VerificationError(
        f"exact pass {p.name!r} changed the outputs (max|Δ|={d.get('max_abs', float('nan')):.3e}, "
        f"rel={d.get('rel', float('nan')):.3e} > rtol={rtol:g}){where}",
        pass_name=p.name,
        node=node.name if node is not None else None,
    )


def _write_reproducer(dump: DumpDir, before: Graph | None, so_far: str, inputs) -> Path | None:
    if before is None:
        return None
    d = dump.dir / "reproducer"
    d.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(before.module, d / "graph.pt")
    except Exception as e:  # pragma: no cover - unpicklable custom modules
        log.warning("could not save the reproducer graph: %s", e)
    torch.save(tuple(inputs), d / "inputs.pt")
    write_text(d / "pipeline.txt", so_far + "\n")
    write_text(d / "graph.py", before.module.code)
    return d


def compress(
    model_or_graph: torch.nn.Module | Graph,
    pipeline: str | Pipeline,
    example_inputs: Any = None,
    data: Any = None,
    leaf_modules: Iterable[Any] = (),
    **run_kwargs: Any,
) -> PipelineResult:
    """One call: trace (if given a module), parse the pipeline, run it."""
    from .tracing import trace

    if isinstance(model_or_graph, Graph):
        graph = model_or_graph.copy()
    else:
        if example_inputs is None:
            batch = first_batch(data)
            if batch is None:
                raise GraphoptError("compress() needs example_inputs (or data to take them from)")
            example_inputs = tuple(t[:1] for t in batch)
        graph = trace(model_or_graph, example_inputs, leaf_modules=leaf_modules)
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
    return pipe.run(graph, data=data, **run_kwargs)
