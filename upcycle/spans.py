"""Layer lists as people read them: 0,1,2,5 -> "0-2, 5" (the CLI, plan refusals and model cards all say it so)."""

from __future__ import annotations

from collections.abc import Iterable


def layer_spans(layers: Iterable[int]) -> str:
    """Sorted runs of consecutive indices, each written "a-b" (or "a" alone), joined by ", "."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
