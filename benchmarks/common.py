"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, begin: str, end: str, section: str) -> None:
    """Replace the ``begin``..``end`` marker section of a results file (``section`` includes both
    markers), keeping whatever else the file holds; append it when the markers are not there yet."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + section.rstrip("\n") + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def markdown_table(columns, rows) -> list[str]:
    """A markdown table's lines; ``|`` inside a cell is escaped."""
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows)]


def text_table(columns, rows) -> str:
    """The same table for a terminal: columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]
    lines = [columns, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
