"""graphopt.table.render: aligned plain text and Markdown tables."""

from __future__ import annotations

from graphopt.table import render


def test_plain_columns_align_and_trailing_space_is_trimmed():
    text = render(["a", "long header"], [["1", "x"], ["12345", "yy"]])
    lines = text.splitlines()
    assert lines[0] == "a     | long header"
    assert lines[1] == "------+------------"
    assert lines[2] == "1     | x"
    assert {len(line.split("|")[0]) for line in lines if "|" in line} == {6}


def test_markdown_is_a_valid_pipe_table():
    lines = render(["x", "y"], [["1", "22"]], markdown=True).splitlines()
    assert lines == ["| x | y  |", "|---|----|", "| 1 | 22 |"]
