"""Per-item outcomes and their aggregates: acc, acc_norm and standard errors as the harness has them; bits per byte
per item, averaged over the items (OLMES' convention; the harness' corpus-level figure is a ratio of sums)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from upcycle.downstream.items import Item
from upcycle.downstream.loglikelihood import Scored
from upcycle.downstream.tasks import TaskSpec

DELIMITER = " "  # the harness joins question and choice with it, and leaves it out of a choice's length


@dataclass(frozen=True)
class Outcome:
    """What the model chose for one item, and how well it predicted the gold continuation."""

    prediction: int  # argmax of the log-likelihoods (last-word tasks: 0 if greedy decoding gives the gold, else -1)
    prediction_norm: int  # argmax of the log-likelihoods per character
    gold: int
    gold_bits_per_byte: float

    @property
    def acc(self) -> float:
        return float(self.prediction == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.prediction_norm == self.gold)


def outcome(spec: TaskSpec, item: Item, scored: Sequence[Scored]) -> Outcome:
    gold_text = item.choices[item.gold].continuation
    bits_per_byte = -scored[item.gold].logprob / math.log(2) / max(1, len(gold_text.encode("utf-8")))
    if spec.kind == "last_word":
        hit = 0 if scored[0].greedy else -1
        return Outcome(hit, hit, 0, bits_per_byte)
    logprobs = [s.logprob for s in scored]
    lengths = [max(1, len(c.continuation.removeprefix(DELIMITER))) for c in item.choices]
    per_char = [lp / n for lp, n in zip(logprobs, lengths, strict=True)]
    return Outcome(_argmax(logprobs), _argmax(per_char), item.gold, bits_per_byte)


def _argmax(values: Sequence[float]) -> int:
    """The first of the largest, as numpy's argmax (the harness') breaks ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample standard deviation / sqrt(n)), as the harness reports;
    None for one item, which has no spread to measure."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
