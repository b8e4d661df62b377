"""Real text as token ids for a model folder: its own tokenizer when it has one, else the text's UTF-8 bytes."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from upcycle.errors import SourceError


def tokenize_text(folder: Path, text: str, tokens: int, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Exactly `tokens` ids (the text repeated when short), and how they were made ("" or a note to append)."""
    note = ""
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[0]
    else:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab_size
        note = " (UTF-8 bytes; no tokenizer)"
    if len(ids) == 0:  # a text of only whitespace, under a tokenizer that drops it
        raise SourceError(
            f"the text ({len(text)} characters) has no tokens under {folder}'s tokenizer.",
            "pass a text with words in it (--calibration FILE).",
        )
    if len(ids) < tokens:
        note += f" (repeated {math.ceil(tokens / len(ids))}x)"
        ids = ids.repeat(math.ceil(tokens / len(ids)))
    return ids[:tokens], note
