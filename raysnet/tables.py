"""Markdown tables of numbers, shared by the sweep summary and the report."""

from __future__ import annotations


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt(v: float | None, signed: bool = False) -> str:
    """Two decimals (an error in %), blank when missing."""
    return "" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")
