"""The one Markdown table writer: its layout is what `moco report`, the detection summaries and the benchmarks print."""

from __future__ import annotations

from moco_transfer.markdown import escape, table


def test_table_layout_escapes_pipes_and_writes_empty_cells_as_one_space() -> None:
    lines = table(["run", "MLP", "top-1"], [["a|b", "", 57.25], ["c", "✓", "–"]])
    assert lines == ["| run | MLP | top-1 |", "|---|---|---|", "| a\\|b | | 57.25 |", "| c | ✓ | – |"]
    # a parser splitting on unescaped pipes sees three cells in every row
    assert all(len(line.replace("\\|", "").strip("|").split("|")) == 3 for line in lines)
    assert escape("x | y") == "x \\| y"
