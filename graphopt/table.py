"""Plain-text and Markdown tables for reports."""

from __future__ import annotations

from collections.abc import Sequence


def render(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    cols = list(zip(*([list(head)] + [list(map(str, r)) for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        body = " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))
        return f"| {body} |" if markdown else body.rstrip()

    sep = (
        ("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        if markdown
        else "-+-".join("-" * w for w in widths)
    )
    return "\n".join([line(head), sep, *(line(r) for r in rows)])
