"""How numbers are written in reports and cards: one place, so a stage's own card section (below `evaluation/`)
writes them exactly as the card's tables do."""

from __future__ import annotations


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) < 10:
        return f"{value:.4f}"
    return f"{value:,.2f}"


def fmt_bytes(value: int) -> str:
    if value < 2**20:
        return f"{value / 2**10:,.1f} KiB"
    if value < 2**30:
        return f"{value / 2**20:,.1f} MiB"
    return f"{value / 2**30:,.2f} GiB"


def fmt_params(value: int) -> str:
    return f"{value / 1e6:,.2f}M ({value:,})"


__all__ = ["fmt_bytes", "fmt_number", "fmt_params"]
