"""Typed pass options: a dataclass per pass, filled from the pipeline text.

Field names are snake_case in Python and kebab-case in the text (``max_ratio`` is written
``max-ratio``). Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``
(a choice), ``tuple[str, ...]`` / ``tuple[float, ...]`` (written ``[a,b]``, or one bare value)
and ``X | None`` (written ``none``). A field's ``metadata["help"]`` documents it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

from .errors import OptionError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass that takes no options."""


@dataclasses.dataclass(frozen=True)
class Raw:
    """One option value as written: a bare token, a quoted string, or a list of raw values."""

    value: str | tuple[Raw, ...]
    quoted: bool = False


def text_name(field_name: str) -> str:
    return field_name.replace("_", "-")


def field_name(text: str) -> str:
    return text.replace("-", "_")


def fields_of(options_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(options_cls) if f.init]


def _hints(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(describe_type(a) for a in args)
        return f"{inner} or none" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {describe_type(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(raw: Raw, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and not raw.quoted and raw.value == "none":
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(raw, a, where)
            except OptionError as e:
                errors.append(str(e))
        raise OptionError(f"{where} expects {describe_type(tp)}, got {format_raw(raw)}")
    if origin in (tuple, list):
        (elem, *_rest) = typing.get_args(tp) or (str,)
        items = raw.value if isinstance(raw.value, tuple) else (raw,)
        return tuple(_coerce(r, elem, where) for r in items)
    if isinstance(raw.value, tuple):
        raise OptionError(f"{where} expects {describe_type(tp)}, got a list {format_raw(raw)}")
    s = raw.value
    if origin is Literal:
        choices = typing.get_args(tp)
        if s in choices:
            return s
        near = difflib.get_close_matches(s, [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise OptionError(f"{where} must be one of {', '.join(map(str, choices))}, got {s!r}{hint}")
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise OptionError(f"{where} expects true or false, got {s!r}")
    if tp is int:
        try:
            return int(s)
        except ValueError:
            raise OptionError(f"{where} expects an integer, got {s!r}") from None
    if tp is float:
        try:
            return float(s)
        except ValueError:
            raise OptionError(f"{where} expects a number, got {s!r}") from None
    if tp is str:
        return s
    raise OptionError(f"{where} has an unsupported type {tp!r}")  # pragma: no cover


def build_options(pass_name: str, options_cls: type, given: dict[str, Raw]) -> Any:
    """Instantiate ``options_cls`` from raw text values, checking names and types."""
    hints = _hints(options_cls)
    known = {text_name(f.name): f for f in fields_of(options_cls)}
    kwargs = {}
    for key, raw in given.items():
        f = known.get(key) or known.get(text_name(key))
        if f is None:
            if not known:
                raise OptionError(f"pass {pass_name!r} takes no options, got {key!r}")
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise OptionError(
                f"pass {pass_name!r} has no option {key!r}{hint} (options: {', '.join(known)})"
            )
        kwargs[f.name] = _coerce(raw, hints[f.name], f"{pass_name}: option {text_name(f.name)!r}")
    try:
        return options_cls(**kwargs)
    except OptionError:
        raise
    except (TypeError, ValueError) as e:
        raise OptionError(f"{pass_name}: {e}") from e


_BARE = re.compile(r"^[A-Za-z0-9_.*?:/+\-]+$")


def format_raw(raw: Raw) -> str:
    if isinstance(raw.value, tuple):
        return "[" + ",".join(format_raw(r) for r in raw.value) + "]"
    return quote(raw.value) if raw.quoted else raw.value


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_value(value: Any) -> str:
    """Canonical text of a typed option value (what the pipeline prints)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    s = str(value)
    return s if _BARE.fullmatch(s) and s.lower() != "none" else quote(s)


def option_help(options_cls: type) -> list[tuple[str, str, str, str]]:
    """(text name, type, default, help) for each option, for ``graphopt passes``."""
    hints = _hints(options_cls)
    rows = []
    for f in fields_of(options_cls):
        if f.default is not dataclasses.MISSING:
            default = format_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = format_value(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append(
            (text_name(f.name), describe_type(hints[f.name]), default, f.metadata.get("help", ""))
        )
    return rows
