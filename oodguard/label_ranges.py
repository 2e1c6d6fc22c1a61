"""Class labels as people type them on a command line: ``0-7``, ``0,1,2`` or ``0-3,7`` (no numpy, so that the
CLI's parser can use it without loading it)."""

from __future__ import annotations


def parse_labels(text: str) -> list[int]:
    """'0-7', '0,1,2' or '0-3,7' as a list of ints, in the order written."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high) + 1) if high else [int(low)])
    return out


__all__ = ["parse_labels"]
