"""Markdown tables as the pages write them: a header, a separator of as many columns, one line per row."""

from __future__ import annotations

import pytest

from eva_rl.experiments.markdown import table, table_row


def cells_of(line: str) -> list[str]:
    """A table line read back into its cells (the oracle: split on the pipes)."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return [cell.strip() for cell in line[1:-1].split("|")]


@pytest.mark.parametrize(
    "columns", [["method"], ["method", "final", "AUC"], ["approach", *(f"r = {r}" for r in (1, 2, 4))]]
)
def test_a_table_has_a_header_a_separator_of_as_many_columns_and_its_rows(columns: list[str]) -> None:
    rows = [[f"{column}-{i}" for column in columns] for i in range(3)]
    lines = table(columns, rows)
    assert len(lines) == 2 + len(rows)
    assert cells_of(lines[0]) == columns
    assert lines[1].count("---") == len(columns) and set(lines[1]) == {"|", "-"}
    assert [cells_of(line) for line in lines[2:]] == rows


def test_a_table_without_rows_is_its_header_and_a_row_takes_any_iterable() -> None:
    assert table(["a", "b"]) == ["| a | b |", "|---|---|"]
    assert table_row(str(k) for k in range(3)) == "| 0 | 1 | 2 |"
