"""Markdown tables, written one way on every page."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table_row(cells: Iterable[str]) -> str:
    """One line of a table: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def table(columns: Sequence[str], rows: Iterable[Iterable[str]] = ()) -> list[str]:
    """A table's lines: the header, its separator, then one line per row.

    :param columns: The column headings.
    :param rows: The cells of each row, as many as there are columns.
    """
    return [table_row(columns), "|" + "---|" * len(columns), *(table_row(row) for row in rows)]
