"""The pipeline text grammar, parsed without knowing any pass::

    pipeline := item ("," item)*
    item     := NAME [ "(" [ option ("," option)* ] ")" ]
    option   := KEY "=" value
    value    := BARE | QUOTED | "[" [ value ("," value)* ] "]"

``NAME`` and ``KEY`` are letters, digits, ``_``, ``-`` and ``.``; ``BARE`` also allows
``* ? : / +`` (globs, ``macs:0.5``, ``1e-3``); ``QUOTED`` is a double-quoted string with
backslash escapes. Whitespace between tokens is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PipelineSyntaxError
from .options import Raw

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE = re.compile(r"[A-Za-z0-9_.*?:/+\-]+")


@dataclass
class RawItem:
    name: str
    options: dict[str, Raw]
    position: int


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, what: str) -> PipelineSyntaxError:
        pointer = " " * self.i + "^"
        shown = "".join(c if c.isprintable() else " " for c in self.text)  # one line, aligned
        return PipelineSyntaxError(f"{what} at column {self.i + 1}:\n  {shown}\n  {pointer}")

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.i += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.skip_ws()
        m = pattern.match(self.text, self.i)
        if not m:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.i = m.end()
        return m.group(0)

    def parse(self) -> list[RawItem]:
        items = []
        if not self.text.strip():
            return items
        while True:
            items.append(self.item())
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek() == "":
                return items
            raise self.error(f"expected ',' or end of pipeline, found {self.peek()!r}")

    def item(self) -> RawItem:
        self.skip_ws()
        pos = self.i
        name = self.match(_NAME, "a pass name")
        options: dict[str, Raw] = {}
        if self.peek() == "(":
            self.i += 1
            if self.peek() != ")":
                while True:
                    key_pos = self.i
                    key = self.match(_NAME, "an option name")
                    if key in options:
                        self.i = key_pos
                        raise self.error(f"option {key!r} given twice for pass {name!r}")
                    self.expect("=")
                    options[key] = self.value()
                    if self.peek() == ",":
                        self.i += 1
                        continue
                    break
            self.expect(")")
        return RawItem(name, options, pos)

    def value(self) -> Raw:
        ch = self.peek()
        if ch == '"':
            return Raw(self.quoted(), quoted=True)
        if ch == "[":
            self.i += 1
            items: list[Raw] = []
            if self.peek() != "]":
                while True:
                    items.append(self.value())
                    if self.peek() == ",":
                        self.i += 1
                        continue
                    break
            self.expect("]")
            return Raw(tuple(items))
        return Raw(self.match(_BARE, "a value"))

    def quoted(self) -> str:
        self.i += 1
        out = []
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == "\\" and self.i + 1 < len(self.text):
                out.append(self.text[self.i + 1])
                self.i += 2
                continue
            if c == '"':
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        raise self.error("unterminated quoted string")


def parse_items(text: str) -> list[RawItem]:
    """Split pipeline text into pass names with raw option values."""
    return _Parser(text).parse()
