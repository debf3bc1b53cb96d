"""The report's markdown pieces: a table and a number cell (report.py and eval_history.py share them)."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    """Lines of a markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in [header, align, *rows]]


def fmt(v, spec: str = ".4f") -> str:
    """``v`` formatted with ``spec``, "-" for None."""
    return "-" if v is None else format(v, spec)
