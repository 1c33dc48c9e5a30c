"""Built-in passes, installed as ``graphopt.passes``. One pass per module.

:func:`builtin_passes` is the explicit list the registry loads through graphopt's own
``graphopt.passes`` entry point (``pyproject.toml``); nothing registers itself on import.
"""

from __future__ import annotations


def builtin_passes() -> list[type]:
    from .dce import DeadCodeElimination
    from .distill import Distill
    from .fold_bn import FoldBatchNorm
    from .fold_pad import FoldPad
    from .prune import Prune
    from .qdq import QDQ
    from .remove_identity import RemoveIdentity
    from .sparsify import Sparsify

    return [
        FoldBatchNorm,
        FoldPad,
        DeadCodeElimination,
        RemoveIdentity,
        Prune,
        Distill,
        Sparsify,
        QDQ,
    ]
