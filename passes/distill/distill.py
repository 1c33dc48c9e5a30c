"""``distill``: train the compressed student against the teacher (by default the model as it
was traced), on logits and optionally on features paired by provenance.

The objective and the loop are in :mod:`graphopt.passes.distill.loop`; this pass hands it the graph, the
teacher, the data, the output directory and the progress bar, and reports what happened.
"""

from __future__ import annotations

from graphopt.graph import Graph
from graphopt.pass_api import Pass, PassContext, PassResult
from graphopt.passes.distill.loop import DistillOptions, distill, teacher_for


class Distill(Pass):
    """Knowledge distillation from the teacher: KD on logits, labels when present, features."""

    name = "distill"
    exact = False
    Options = DistillOptions
    needs_data = True
    needs_teacher = True

    @classmethod
    def uses_teacher(cls, options: DistillOptions) -> bool:
        return options.teacher is None  # a teacher from a file needs no snapshot of the graph

    @classmethod
    def trains(cls, options) -> bool:
        return options.epochs > 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts: DistillOptions = self.options
        default = None if opts.teacher else ctx.teacher
        teacher = teacher_for(opts.teacher, graph, default, opts.trust_pickle)
        if opts.epochs == 0:
            return PassResult(False, {"summary": "epochs=0: nothing trained"})
        report = distill(
            graph,
            teacher,
            ctx.data,
            opts,
            out_dir=ctx.checkpoint_dir or ctx.out_dir,
            progress=ctx.progress,
        )
        return PassResult(modified=report["epochs_run"] > 0, report=report)
