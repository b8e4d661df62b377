"""Batch arithmetic: how a step's global batch splits into ranks, micro-batches and accumulation steps.

Every split must be exact: ranks or micro-steps given unequal shares would see different numbers of sequences and
change the loss average. :func:`exact_quotient` is the one place that checks it; the functions here only word the
refusal for what the user set. Pure integer arithmetic, so the recipe can use it without importing numpy or torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from upcycle.errors import OptionError

if TYPE_CHECKING:
    from upcycle.train.recipe_sections import BatchSection


# ------------------------------------------------------------------------------------------- argument checks


def is_integer(value: Any) -> bool:
    """An int or a numpy integer, never a bool (True is not a batch size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: Any, fix: str | None = None) -> int:
    if not is_integer(value) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}.", fix)
    return int(value)


def non_negative_int(name: str, value: Any, fix: str | None = None) -> int:
    if not is_integer(value) or value < 0:
        raise OptionError(f"{name} must be a non-negative integer, got {value!r}.", fix)
    return int(value)


def rank_of(rank: Any, world_size: int) -> int:
    """``rank`` checked to be one of ``world_size`` ranks."""
    if not is_integer(rank) or not 0 <= rank < world_size:
        raise OptionError(f"rank must be in [0, {world_size}), got {rank!r}.", None)
    return int(rank)


def exact_quotient(total: int, factors: Sequence[int], refuse: Callable[[str, int], OptionError]) -> int:
    """``total`` divided by the product of ``factors``, which must divide it exactly.

    Otherwise raises ``refuse(arithmetic, product)``, where the arithmetic is spelled out (``"128 x 4 x 3 = 1536"``)
    so the message shows where the product comes from.
    """
    product = math.prod(factors)
    if total % product:
        raise refuse(f"{' x '.join(str(f) for f in factors)} = {product}", product)
    return total // product


# ------------------------------------------------------------------------------------------------ the split


def grad_accum_steps(global_batch_sequences: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per rank per step: global batch / (micro-batch x ranks), which must divide exactly."""
    b = positive_int("global batch (sequences)", global_batch_sequences)
    m = positive_int("micro_batch_size", micro_batch_size)
    w = positive_int("world_size", world_size)

    def refuse(arithmetic: str, per: int) -> OptionError:
        lower, upper = max(per, b // per * per), (b // per + 1) * per
        return OptionError(
            f"The global batch of {b} sequences does not split into micro-batches of {m} on {w} rank(s) "
            f"({b} is not a multiple of {arithmetic}).",
            f"Use a global batch of {lower} or {upper} sequences, or change micro_batch_size.",
        )

    return exact_quotient(b, (m, w), refuse)


def check_whole_micro_batches(global_batch_tokens: int | None, seq_len: int, micro_batch_size: int) -> None:
    """At load time, before the world size is known: ``batch.global_batch_tokens`` must hold whole micro-batches.

    The split over ranks is checked by :func:`resolve_batch` once the world size is known.
    """
    if global_batch_tokens is None:
        return

    def refuse(arithmetic: str, per_step: int) -> OptionError:
        seqs = global_batch_tokens / seq_len
        return OptionError(
            f"batch.global_batch_tokens ({global_batch_tokens}) is not a multiple of data.seq_len "
            f"x batch.micro_batch_size ({arithmetic}).",
            f"use a multiple of {per_step}, e.g. {max(1, round(seqs / micro_batch_size)) * per_step}.",
        )

    exact_quotient(global_batch_tokens, (seq_len, micro_batch_size), refuse)


@dataclass(frozen=True)
class ResolvedBatch:
    """The batch and budget as numbers for one world size."""

    micro_batch_size: int  # sequences per rank per micro-step
    grad_accum: int  # micro-steps per optimiser step
    world_size: int
    global_batch_sequences: int  # sequences per optimiser step, all ranks together
    tokens_per_step: int
    steps: int

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def resolve_batch(batch: BatchSection, seq_len: int, world_size: int) -> ResolvedBatch:
    """Gradient accumulation and step count for ``world_size`` ranks, or an OptionError saying what to change.

    The recipe's ``batch`` section was validated when it was built (one of grad_accum / global_batch_tokens at
    most, exactly one of steps / tokens); only the split over ``world_size`` ranks is new here.
    """
    world_size = positive_int("world size", world_size, "launch at least one rank.")
    micro = batch.micro_batch_size
    if batch.global_batch_tokens is not None:
        tokens = batch.global_batch_tokens

        def refuse(arithmetic: str, _: int) -> OptionError:
            return OptionError(
                f"batch.global_batch_tokens ({tokens}) is not a multiple of data.seq_len x "
                f"batch.micro_batch_size x world size ({arithmetic}).",
                _global_batch_fix(tokens, seq_len, micro, world_size),
            )

        grad_accum = exact_quotient(tokens, (seq_len, micro, world_size), refuse)
    else:
        grad_accum = batch.grad_accum or 1
    sequences = micro * grad_accum * world_size
    tokens_per_step = sequences * seq_len
    steps = batch.steps if batch.steps is not None else -(-(batch.tokens or 0) // tokens_per_step)  # ceil
    return ResolvedBatch(micro, grad_accum, world_size, sequences, tokens_per_step, steps)


def _global_batch_fix(global_tokens: int, seq_len: int, micro: int, world_size: int) -> str:
    sequences = global_tokens // seq_len
    if global_tokens % seq_len or sequences % world_size:
        return (
            f"make batch.global_batch_tokens a multiple of {seq_len * micro * world_size}, or use a world size "
            f"that divides the {sequences} sequences per step."
        )
    per_rank = sequences // world_size
    fits = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return f"set batch.micro_batch_size to a divisor of {per_rank} (sequences per rank per step), e.g. {fits}."
