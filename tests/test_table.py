"""graphopt.table: aligned plain text and Markdown tables, and their cells."""

from __future__ import annotations

import pytest

from graphopt.table import cell, render


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


def test_a_wide_cell_widens_its_column_and_numbers_are_cells():
    lines = render(["n", "name"], [[1234567, "a"], [None, "bb"]]).splitlines()
    assert lines == ["n       | name", "--------+-----", "1234567 | a", "None    | bb"]


def test_a_short_row_keeps_every_column():
    """A row with fewer cells than the head is padded, not allowed to drop the last columns."""
    lines = render(["a", "b", "c"], [["1"], ["1", "2", "333"]]).splitlines()
    assert lines[0] == "a | b | c"
    assert lines[2] == "1 |   |"
    assert lines[3] == "1 | 2 | 333"


def test_a_row_longer_than_the_head_is_an_error():
    with pytest.raises(ValueError, match="3 cells but the head has 2"):
        render(["a", "b"], [["1", "2", "3"]])


def test_no_rows_is_a_head_and_a_rule():
    assert render(["ab", "c"], []) == "ab | c\n---+--"


def test_cell_formats_or_marks_missing():
    assert cell(1234567, ",") == "1,234,567"
    assert cell(0.5, ".4f") == "0.5000"
    assert cell(0, ",") == "0"  # zero is a value, not missing
    assert cell(None, ".4f") == "-"
    assert cell("x") == "x"
