"""The held-out evaluation plan: the same sequences every time, split over ranks that run in lockstep."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import SourceError
from upcycle.train.batch_size import non_negative_int, positive_int, rank_of
from upcycle.train.packing import PackedDataset


@dataclass(frozen=True)
class EvalPlan:
    """One rank's held-out micro-batches, padded so every rank runs the same number of equal-shape forwards.

    Lockstep matters: under FSDP each forward all-gathers parameters, so a rank that ran fewer forwards would hang
    the others. ``counts[i]`` says how many leading rows of ``batches[i]`` are real; the rest repeat a real
    sequence and must be ignored. Exact mean: sum the per-sequence losses of the real rows, all-reduce the sum,
    divide by ``total`` (every sequence has the same number of tokens, so this is also the per-token mean).
    """

    batches: list[list[int]]
    counts: list[int]
    total: int

    @property
    def local_sequences(self) -> int:
        """Real sequences on this rank."""
        return sum(self.counts)


def eval_batches(
    dataset: PackedDataset | int, num_sequences: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
) -> EvalPlan:
    """The held-out plan: the first ``num_sequences`` sequences (all when 0, at most all), split over ranks.

    Always the same sequences, so evaluations across a run (and across runs and rank counts) are comparable.
    Rank r takes a contiguous share of ceil(total / world_size) (the last ranks may get fewer or none).
    """
    available = dataset if isinstance(dataset, int) else len(dataset)
    wanted = non_negative_int("eval sequences", num_sequences, "0 means all.")
    micro = positive_int("micro_batch_size", micro_batch_size)
    world = positive_int("world_size", world_size)
    rank = rank_of(rank, world)
    total = min(wanted, available) if wanted else available
    if total < 1:
        raise SourceError("The held-out text gives no sequence to evaluate.", "Add held-out text or lower seq_len.")
    share = -(-total // world)
    mine = list(range(min(rank * share, total), min((rank + 1) * share, total)))
    num_batches = -(-share // micro)
    batches: list[list[int]] = []
    counts: list[int] = []
    for i in range(num_batches):
        real = mine[i * micro : (i + 1) * micro]
        pad = real[0] if real else 0
        batches.append(real + [pad] * (micro - len(real)))
        counts.append(len(real))
    return EvalPlan(batches=batches, counts=counts, total=total)
