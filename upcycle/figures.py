"""A matplotlib figure written atomically (all of it or nothing at OUT) and always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from upcycle.output_safety import staged


def save_figure(fig: Any, out: Path, force: bool, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    try:
        with staged(out, force, kind="file") as tmp:
            fig.savefig(tmp, dpi=dpi, format=out.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return out
