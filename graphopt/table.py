"""Plain-text and Markdown tables for reports, and the cell formatting they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any, spec: str = "") -> str:
    """``value`` formatted with the format ``spec`` (``","`` for counts, ``".4f"`` for
    accuracies, ...), or ``-`` when it is missing (``None``)."""
    return "-" if value is None else format(value, spec)


def render(head: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """``head`` and ``rows`` as a table with left-aligned columns as wide as their widest cell:
    ``a | b`` lines under a ``--+--`` rule, or a Markdown table with ``markdown=True``. A row
    shorter than ``head`` is padded with empty cells; a longer one is an error."""
    n = len(head)
    cells = [[str(c) for c in head]]
    for r in rows:
        if len(r) > n:
            raise ValueError(f"table row has {len(r)} cells but the head has {n}: {list(r)!r}")
        cells.append([str(c) for c in r] + [""] * (n - len(r)))
    widths = [max(len(row[i]) for row in cells) for i in range(n)]

    def line(row: Sequence[str]) -> str:
        body = " | ".join(c.ljust(w) for c, w in zip(row, widths))
        return f"| {body} |" if markdown else body.rstrip()

    sep = (
        ("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        if markdown
        else "-+-".join("-" * w for w in widths)
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
