"""Built-in passes, installed as ``graphopt.passes``. One pass per module.

:func:`builtin_passes` is the explicit table the registry reads through graphopt's own
``graphopt.passes`` entry point (``pyproject.toml``); nothing registers itself on import. The
table maps each pass name to ``"module:Class"``, and the registry imports a pass's module only
when that pass is asked for, so ``Pipeline.parse("prune")`` does not pay for importing qdq or
distill (their imports cost about 0.3 s cold).
"""

from __future__ import annotations

BUILTIN_PASSES: dict[str, str] = {
    "fold-bn": "graphopt.passes.fold_bn:FoldBatchNorm",
    "fold-pad": "graphopt.passes.fold_pad:FoldPad",
    "dce": "graphopt.passes.dce:DeadCodeElimination",
    "remove-identity": "graphopt.passes.remove_identity:RemoveIdentity",
    "prune": "graphopt.passes.prune:Prune",
    "distill": "graphopt.passes.distill:Distill",
    "sparsify": "graphopt.passes.sparsify:Sparsify",
    "qdq": "graphopt.passes.qdq:QDQ",
}


def builtin_passes() -> dict[str, str]:
    """Pass name -> ``"module:Class"`` of every built-in pass (imported on first use)."""
    return dict(BUILTIN_PASSES)
