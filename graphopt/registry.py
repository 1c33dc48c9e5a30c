"""Where passes are found: the ``graphopt.passes`` entry-point group (graphopt's own built-ins
are its ``builtin`` entry, ``graphopt.passes:builtin_passes``; every other package's are
plug-ins) and passes registered at run time with :func:`register_pass`.

The registry imports no pass module by name; nothing registers itself as a side effect of
being imported. Built-ins win over a plug-in that claims the same name. An entry point may
name its passes lazily, as a dict ``{pass name: "module:Class"}``: the module is imported when
the pass is first asked for (the built-ins do this, so parsing ``prune`` imports no quantizer).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib import metadata
from typing import Any

from .errors import UnknownPassError
from .options import NoOptions
from .pass_api import Pass, function_pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt.passes"


class Registry:
    """Name -> pass class, with the origin of each (``builtin``, ``plugin:<dist>``, ``user``)."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._origin: dict[str, str] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:Class", imported on first use
        self._loaded = False

    def add(self, cls: type[Pass], origin: str = "user", replace: bool = False) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"{cls!r} is not a graphopt Pass subclass")
        if not cls.name:
            raise ValueError(f"pass class {cls.__name__} has no name")
        known = self._passes.get(cls.name)
        taken = cls.name in self._lazy or (known is not None and known is not cls)
        if taken and not replace:
            raise ValueError(
                f"a pass named {cls.name!r} is already registered "
                f"(from {self._origin[cls.name]}); choose another name"
            )
        self._passes[cls.name] = cls
        self._origin[cls.name] = origin
        self._lazy.pop(cls.name, None)

    def _add_lazy(self, name: str, ref: str, origin: str) -> None:
        self._lazy[name] = ref
        self._origin[name] = origin

    def _resolve(self, name: str) -> type[Pass]:
        """Import a lazily named pass and check that it is the pass the table promised."""
        ref = self._lazy[name]
        module, _, attr = ref.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Pass)) or cls.name != name:
            raise TypeError(
                f"entry {name!r} -> {ref!r} is not a graphopt Pass named {name!r} "
                f"(got {cls!r}); fix the package's graphopt.passes entry point"
            )
        self.add(cls, self._origin[name], replace=True)
        return cls

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_builtin_first)
        if not any(_is_builtin(ep) for ep in eps):
            log.warning(
                "graphopt's built-in passes are not registered: its entry points are missing "
                "(reinstall graphopt: pip install -e . or pip install graphopt)"
            )
        for ep in eps:
            builtin = _is_builtin(ep)
            origin = "builtin" if builtin else f"plugin:{ep.dist.name if ep.dist else ep.value}"
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj = obj()
                lazy = _lazy_table(obj)
            except Exception as e:
                log.warning(
                    "plug-in pass entry point %r (%s) failed to load: %s", ep.name, ep.value, e
                )
                continue
            if lazy is not None:
                for name, ref in lazy.items():
                    if builtin or self._origin.get(name) != "builtin":
                        self._add_lazy(name, ref, origin)
                    else:
                        log.warning(
                            "plug-in %s tries to replace built-in pass %r; ignored", origin, name
                        )
                continue
            for cls in _pass_classes(obj):
                if builtin:
                    self.add(cls, "builtin", replace=True)
                    continue
                if self._origin.get(cls.name) == "builtin":
                    log.warning(
                        "plug-in %s tries to replace built-in pass %r; ignored", origin, cls.name
                    )
                    continue
                self.add(cls, origin, replace=True)

    def get(self, name: str) -> type[Pass]:
        self._ensure_loaded()
        if name in self._lazy:
            return self._resolve(name)
        if name in self._passes:
            return self._passes[name]
        near = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UnknownPassError(f"unknown pass {name!r}{hint} (run 'graphopt passes' to list them)")

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted({*self._passes, *self._lazy})

    def origin(self, name: str) -> str:
        self._ensure_loaded()
        return self._origin[name]

    def items(self) -> list[tuple[str, type[Pass]]]:
        self._ensure_loaded()
        for name in list(self._lazy):
            self._resolve(name)
        return sorted(self._passes.items())

    def reload(self) -> None:
        """Forget plug-ins and built-ins and discover them again (user passes are kept)."""
        user = {n: c for n, c in self._passes.items() if self._origin[n] == "user"}
        self._passes, self._origin, self._lazy, self._loaded = {}, {}, {}, False
        self._ensure_loaded()
        for cls in user.values():
            self.add(cls, "user", replace=True)


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return ep.value.split(":")[0] == "graphopt.passes"


def _builtin_first(ep: metadata.EntryPoint) -> int:
    return 0 if _is_builtin(ep) else 1


def _lazy_table(obj: Any) -> dict[str, str] | None:
    """The entry point's ``{name: "module:Class"}`` table, if it gives one; ``None`` when it
    gives pass classes instead."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) and isinstance(v, str) and ":" in v for k, v in obj.items()):
            raise TypeError(f"a lazy pass table must map names to 'module:Class', got {obj!r}")
        return dict(obj)
    return None


def _pass_classes(obj: Any) -> list[type[Pass]]:
    if isinstance(obj, type) and issubclass(obj, Pass):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [c for o in obj for c in _pass_classes(o)]
    if callable(obj):
        return _pass_classes(obj())
    raise TypeError(f"entry point object {obj!r} is neither a Pass subclass nor a list of them")


REGISTRY = Registry()


def register_pass(
    arg: Any = None,
    *,
    name: str | None = None,
    exact: bool = False,
    options: type = NoOptions,
    registry: Registry | None = None,
) -> Any:
    """Register a pass class, or turn a function ``fn(graph, ctx, options)`` into one.

    Usable as ``@register_pass`` on a :class:`Pass` subclass, or as
    ``@register_pass(name="my-pass", exact=True, options=MyOptions)`` on a function.
    """
    reg = registry or REGISTRY

    def deco(obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, Pass):
            if name:
                obj.name = name
            reg.add(obj, "user", replace=True)
            return obj
        if callable(obj):
            cls = function_pass(obj, name or obj.__name__.replace("_", "-"), exact, options)
            reg.add(cls, "user", replace=True)
            return cls
        raise TypeError(f"@register_pass cannot register {obj!r}")

    if arg is None:
        return deco
    if isinstance(arg, str):
        name = arg
        return deco
    return deco(arg)


def get_pass(name: str) -> type[Pass]:
    return REGISTRY.get(name)
