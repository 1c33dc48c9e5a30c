"""Pipeline text: parse / print round-trip, typed options, clear errors."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.errors import OptionError, PipelineSyntaxError, UnknownPassError
from graphopt.options import format_value
from graphopt.pass_api import Pass, PassResult
from graphopt.pipeline_text import parse_items
from graphopt.registry import Registry


@dataclasses.dataclass(frozen=True)
class _Opts:
    ratio: float = 0.5
    steps: int = 1
    enabled: bool = True
    mode: Literal["local", "global"] = "local"
    label: str = "x"
    ignore: tuple[str, ...] = ()
    limit: float | None = None


class _Demo(Pass):
    """A pass used only to exercise the parser."""

    name = "demo-pass"
    exact = True
    Options = _Opts

    def run(self, graph, ctx):
        return PassResult(False)


class _Other(Pass):
    name = "other"

    def run(self, graph, ctx):
        return PassResult(False)


@pytest.fixture()
def reg():
    r = Registry()
    r._loaded = True  # no built-ins or plug-ins: a closed world for the grammar tests
    r.add(_Demo)
    r.add(_Other)
    return r


def test_roundtrip_examples(reg):
    for text in [
        "demo-pass",
        "demo-pass(ratio=0.25,steps=3),other",
        'demo-pass(label="a b,c",ignore=[features.0*,"x y"])',
        "demo-pass(mode=global,enabled=false,limit=none)",
        "other,other,demo-pass(limit=1e-05)",
    ]:
        p = graphopt.Pipeline.parse(text, registry=reg)
        assert str(p) == text
        assert graphopt.Pipeline.parse(str(p), registry=reg) == p


def test_whitespace_and_types(reg):
    p = graphopt.Pipeline.parse(" demo-pass ( ratio = .5 , steps=2 ) , other ", registry=reg)
    opts = p.specs[0].options
    assert opts.ratio == 0.5 and isinstance(opts.ratio, float)
    assert opts.steps == 2 and isinstance(opts.steps, int)
    assert str(p) == "demo-pass(ratio=0.5,steps=2),other"


def test_kebab_case_names(reg):
    p = graphopt.Pipeline.parse("demo-pass(ignore=a.*)", registry=reg)
    assert p.specs[0].options.ignore == ("a.*",)


_names = st.sampled_from(["demo-pass", "other"])
_labels = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x00"), max_size=8)
_opt_values = {
    "ratio": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "steps": st.integers(-(10**6), 10**6),
    "enabled": st.booleans(),
    "mode": st.sampled_from(["local", "global"]),
    "label": _labels,
    "ignore": st.lists(_labels, max_size=3).map(tuple),
    "limit": st.none() | st.floats(allow_nan=False, allow_infinity=False),
}


@st.composite
def _pipelines(draw):
    items = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(_names)
        if name == "other":
            items.append("other")
            continue
        keys = draw(st.lists(st.sampled_from(sorted(_opt_values)), unique=True, max_size=4))
        opts = [f"{k}={format_value(draw(_opt_values[k]))}" for k in keys]
        items.append(f"demo-pass({','.join(opts)})" if opts else "demo-pass")
    return ",".join(items)


@settings(max_examples=200, deadline=None)
@given(_pipelines())
def test_roundtrip_generated(text):
    r = Registry()
    r._loaded = True
    r.add(_Demo)
    r.add(_Other)
    p = graphopt.Pipeline.parse(text, registry=r)
    assert str(p) == text
    q = graphopt.Pipeline.parse(str(p), registry=r)
    assert q == p
    for a, b in zip(p.specs, q.specs):
        assert a.options == b.options


def test_unknown_pass_suggests(reg):
    with pytest.raises(UnknownPassError, match="did you mean 'demo-pass'"):
        graphopt.Pipeline.parse("demo-pas", registry=reg)


def test_unknown_option_suggests(reg):
    with pytest.raises(OptionError, match="no option 'ration'.*did you mean 'ratio'"):
        graphopt.Pipeline.parse("demo-pass(ration=0.5)", registry=reg)


def test_wrong_type(reg):
    with pytest.raises(OptionError, match="'steps' expects an integer, got '1.5'"):
        graphopt.Pipeline.parse("demo-pass(steps=1.5)", registry=reg)
    with pytest.raises(OptionError, match="must be one of local, global"):
        graphopt.Pipeline.parse("demo-pass(mode=globl)", registry=reg)


def test_no_options_pass(reg):
    with pytest.raises(OptionError, match="takes no options"):
        graphopt.Pipeline.parse("other(x=1)", registry=reg)


@pytest.mark.parametrize(
    "text,where",
    [
        ("demo-pass(ratio=0.5", "expected '\\)'"),
        ("demo-pass,,other", "pass name"),
        ('demo-pass(label="ab)', "unterminated"),
    ],
)
def test_syntax_errors(text, where):
    with pytest.raises(PipelineSyntaxError, match=where):
        parse_items(text)


def test_duplicate_option():
    with pytest.raises(PipelineSyntaxError, match="given twice"):
        parse_items("a(x=1,x=2)")


def test_builtin_registry_has_core_passes():
    names = graphopt.REGISTRY.names()
    for n in ("fold-bn", "dce", "remove-identity"):
        assert n in names
