"""Learning-rate schedules: linear warmup to the peak, then cosine (the paper's choice), linear or constant decay."""

from __future__ import annotations

import math


def lr_at(
    step: int, *, peak: float, minimum: float, warmup_steps: int, total_steps: int, kind: str = "cosine"
) -> float:
    """The learning rate for optimizer step `step` (0-based); a pure function of the step, so resume is exact.

    One peak, at the last warmup step (step 0 without warmup); the decay then reaches `minimum` at the last step,
    `total_steps - 1`.
    """
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    peak_step = max(warmup_steps - 1, 0)
    progress = min(1.0, (step - peak_step) / max(1, total_steps - 1 - peak_step))
    if kind == "linear":
        return peak - (peak - minimum) * progress
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))
