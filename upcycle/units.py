"""Byte counts as people read them: one formatter for every message and report."""

from __future__ import annotations


def format_bytes(count: int | float) -> str:
    """1.50 GiB, 12.00 MiB, 512 B: binary units, two decimals."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"
