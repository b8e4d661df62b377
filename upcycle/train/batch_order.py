"""Which sequences each step trains on, on each rank: a pure function of (seed, number of sequences, step, batch).

The data position of a run is just its step (or its stream position), which makes resume exact and lets 1 rank
and N ranks see the same global batch.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from upcycle.errors import OptionError
from upcycle.train.batch_size import grad_accum_steps, is_integer, non_negative_int, positive_int, rank_of


class BatchOrder:
    """Which sequences each step trains on: a pure function of (seed, num_sequences, step, global batch).

    The sample stream is epoch 0's permutation, then epoch 1's, ... (each ``torch.randperm`` seeded from
    (seed, epoch)); step ``s`` takes stream positions ``[s*B, (s+1)*B)``, running on into the next epoch without
    a gap. Nothing else is stateful, so a resumed run needs only its step. When B exceeds the number of
    sequences a batch spans several epochs and holds repeats.
    """

    def __init__(self, num_sequences: int, seed: int) -> None:
        self.num_sequences = positive_int("num_sequences", num_sequences)
        if not is_integer(seed):
            raise OptionError(f"seed must be an integer, got {seed!r}.", None)
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def epoch_seed(self, epoch: int) -> int:
        """A 63-bit seed from (seed, epoch) by hashing, so nearby seeds and epochs give unrelated orders."""
        # "upcycle.data" is part of the order's definition, not a module name: changing it reorders every run
        digest = hashlib.sha256(f"upcycle.data:{self.seed}:{epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all sequence ids in ``epoch`` (the two most recent epochs are kept)."""
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(self.epoch_seed(epoch))
            perm = torch.randperm(self.num_sequences, generator=generator).numpy()
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def epochs_done(self, step: int, global_batch_sequences: int) -> float:
        """Passes over the data completed before ``step`` (for logging)."""
        return step * global_batch_sequences / self.num_sequences

    def global_batch(self, step: int, global_batch_sequences: int) -> list[int]:
        """Sequence ids of step ``step``'s global batch, in stream order (a run that never changed its batch)."""
        step = non_negative_int("step", step)
        b = positive_int("global batch (sequences)", global_batch_sequences)
        return self.batch_at(step * b, b)

    def batch_at(self, position: int, global_batch_sequences: int) -> list[int]:
        """Sequence ids at stream positions ``[position, position + B)``: where a run stands is its position, so a
        resumed run continues exactly where it stopped even if its batch size changed."""
        start = non_negative_int("position", position)
        b = positive_int("global batch (sequences)", global_batch_sequences)
        n = self.num_sequences
        stop = start + b
        ids: list[int] = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, stop - pos)
            ids.extend(self.permutation(epoch)[offset : offset + take].tolist())
            pos += take
        return ids

    def local_micro_batches(
        self,
        step: int,
        global_batch_sequences: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        position: int | None = None,
    ) -> list[list[int]]:
        """Rank ``rank``'s micro-batches of step ``step``: ``grad_accum_steps`` lists of ``micro_batch_size`` ids.

        The global batch is the one at stream ``position`` (default: ``step`` x the global batch). It is cut into
        ``world_size`` contiguous equal shares (rank r takes share r) and each share into micro-batches, so the
        union over ranks and micro-batches is the global batch and a run on any number of ranks trains on the same
        sequences per step.
        """
        accum = grad_accum_steps(global_batch_sequences, micro_batch_size, world_size)
        rank = rank_of(rank, world_size)
        share = global_batch_sequences // world_size
        batch = (
            self.global_batch(step, global_batch_sequences)
            if position is None
            else self.batch_at(position, global_batch_sequences)
        )
        mine = batch[rank * share : (rank + 1) * share]
        return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(accum)]


def repetition_note(num_sequences: int, global_batch_sequences: int, steps: int) -> str | None:
    """What the user should know when the run sees its data more than once: a warning when one step's batch
    already repeats sequences, a note when the run makes several passes (epochs)."""
    epochs = steps * global_batch_sequences / num_sequences
    if global_batch_sequences > num_sequences:
        return (
            f"warning: a step's global batch of {global_batch_sequences} sequences exceeds the {num_sequences} "
            f"training sequences, so every batch repeats sequences; the run makes {epochs:.3g} passes over the data. "
            "Add data, or lower the batch (batch.micro_batch_size, batch.grad_accum) or data.seq_len."
        )
    if epochs > 1:
        return f"note: the run passes over its {num_sequences} training sequences {epochs:.3g} times (epochs)"
    return None
