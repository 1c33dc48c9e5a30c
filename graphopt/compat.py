"""Module names of graphopt 0.1, kept for one release so that files saved then still load.

A ``model.pt`` pickled by graphopt 0.1 names classes by their old modules
(``graphopt.quant_modules.QuantConv``, ``graphopt.digits.DigitsVGG``). :func:`install` adds an
import hook that answers each old name with a thin module forwarding every attribute to the new
one, so unpickling finds the same classes. Nothing is imported until an old name is asked for.
Remove this module (and its entry in ``graphopt/__init__.py``) in graphopt 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from typing import Any

log = logging.getLogger(__name__)

OLD_NAMES = {
    "graphopt.quant_observers": "graphopt.quant.observers",
    "graphopt.quant_modules": "graphopt.quant.modules",
    "graphopt.quant_dynamic": "graphopt.quant.dynamic",
    "graphopt.quant_placement": "graphopt.passes.qdq.placement",
    "graphopt.quant_rewrite": "graphopt.passes.qdq.rewrite",
    "graphopt.quant_equalize": "graphopt.passes.qdq.equalize",
    "graphopt.distill": "graphopt.passes.distill.loop",
    "graphopt.losses": "graphopt.passes.distill.losses",
    "graphopt.features": "graphopt.passes.distill.features",
    "graphopt.models": "graphopt.zoo.models",
    "graphopt.digits": "graphopt.zoo.digits",
    "graphopt.cli": "graphopt.app.cli",
    "graphopt.demo": "graphopt.app.demo",
    "graphopt.sweep": "graphopt.app.sweep",
    "graphopt.sparsity": "graphopt.masks",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in OLD_NAMES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> types.ModuleType:
        new = OLD_NAMES[spec.name]
        real = importlib.import_module(new)
        log.debug("graphopt: old module name %s now reads %s", spec.name, new)
        alias = types.ModuleType(spec.name, f"Old name of {new} (graphopt.compat).")

        def __getattr__(name: str) -> Any:
            return getattr(real, name)

        alias.__getattr__ = __getattr__  # type: ignore[attr-defined]
        return alias

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_HOOK = _Alias()


def install() -> None:
    """Answer graphopt 0.1's module names (idempotent)."""
    if _HOOK not in sys.meta_path:
        sys.meta_path.append(_HOOK)
