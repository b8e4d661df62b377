"""Packing a token stream into fixed-length training sequences, and stacking them into batches.

The stream is cut into non-overlapping ``seq_len`` windows (the tail is dropped); attention crosses document
boundaries, as in standard packed pre-training.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from upcycle.errors import OptionError, SourceError
from upcycle.train.token_cache import build_token_file, load_tokens, recorded_sha256


class PackedDataset:
    """Non-overlapping ``seq_len`` windows of a token stream; the remainder after the last window is dropped.

    Inputs are also the labels: HF causal LMs shift them internally, so a window of ``seq_len`` tokens trains
    ``seq_len - 1`` next-token predictions. Rows are read lazily from the (memory-mapped) stream.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, tokens_sha256: str | None = None) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise OptionError(f"seq_len must be an integer >= 2, got {seq_len!r}.", "Use e.g. 512 or 2048.")
        if tokens.ndim != 1:
            raise OptionError(f"tokens must be a 1-D stream, got shape {list(tokens.shape)}.", None)
        count = len(tokens) // seq_len
        if count < 1:
            raise SourceError(
                f"The text gives {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len} tokens.",
                "Add more text or lower seq_len.",
            )
        self.seq_len = seq_len
        self.tokens_sha256 = tokens_sha256  # the sha256 of the token stream itself
        self.tokens = tokens
        self.rows = tokens[: count * seq_len].reshape(count, seq_len)  # a view: no copy, even of a memmap

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the sequences (the stream minus the dropped tail)."""
        return self.rows.size

    def __getitem__(self, index: int) -> torch.Tensor:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return torch.from_numpy(self.rows[i].astype(np.int64))


def packed_dataset(
    files: Sequence[Path],
    tokenizer_dir: Path,
    seq_len: int,
    text_field: str = "text",
    cache_dir: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PackedDataset:
    """Build (or reuse) the token cache of ``files`` and pack it: the one call a training run needs per split."""
    path = build_token_file(files, tokenizer_dir, text_field, cache_dir, progress=progress, warn=warn)
    return PackedDataset(load_tokens(path), seq_len, tokens_sha256=recorded_sha256(path))


def make_batch(dataset: PackedDataset, ids: Sequence[int]) -> torch.Tensor:
    """Stack sequences ``ids`` into a LongTensor [len(ids), seq_len] (use it as both input_ids and labels)."""
    index = np.asarray(ids, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= len(dataset)):
        bad = int(index.min() if index.min() < 0 else index.max())
        raise IndexError(f"sequence {bad} out of range for {len(dataset)} sequences")
    batch_bt = dataset.rows[index].astype(np.int64)
    return torch.from_numpy(batch_bt)
