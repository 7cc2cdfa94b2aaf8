"""The one Markdown table writer: `moco report`, the detection summaries and the benchmarks all print with it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def escape(text: object) -> str:
    """`text` with `|` escaped, so that a label holding one cannot split a table row or a parsed line."""
    return str(text).replace("|", "\\|")


def table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a table: headers, the `|---|` rule, one line a row; an empty cell is written `| |`."""
    def line(cells: Sequence[object]) -> str:
        return "|" + "|".join(f" {escape(c)} " if str(c) else " " for c in cells) + "|"
    return [line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]
