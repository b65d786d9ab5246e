"""Small helpers for the words fedrun prints (no heavy imports: the CLI uses them before torch)."""
from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """'1 round', '2 rounds': a count and its noun."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
