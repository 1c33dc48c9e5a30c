"""``prune``: the pass (:mod:`.prune`) and its importance scores (:mod:`.importance`)."""

from .importance import taylor_grads, unit_scores
from .prune import Prune, PruneOptions, apply_plan, prune_once, remove_units, select_units

__all__ = [
    "Prune",
    "PruneOptions",
    "apply_plan",
    "prune_once",
    "remove_units",
    "select_units",
    "taylor_grads",
    "unit_scores",
]
