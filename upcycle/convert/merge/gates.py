"""Router rows for a merge, with mergekit-moe's `gate_mode` semantics; rows are written as they are (unscaled).

- hidden: row e is the hidden state entering each layer at the last token, averaged over expert e's positive
  prompts, minus the same over its negative prompts, normalised (`upcycle.convert.router_prompts`; each prompt
  runs alone in fp32, where mergekit left-pads a batch, which shifts a shorter prompt's positions, in bf16).
- cheap_embed: the normalised sum of the prompts' token embeddings (positive minus negative, normalised again),
  the same row in every layer.
- random: a standard normal draw of [layers, rows, H] from the seed; mergekit draws the same tensor when torch's
  global generator holds that seed.
- uniform_random: uniform in +-1/sqrt(H), as torch.nn.Linear initialises itself.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from upcycle.errors import UnsupportedModelError

EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")


def gate_rows(mode: str, folder: Path, prompts: list, layers: tuple[int, ...], seed: int) -> dict[int, torch.Tensor]:
    """Each layer's rows [len(prompts), H] in fp32: one per routed expert, then one per shared expert."""
    count = len(prompts)
    if mode in ("random", "uniform_random"):
        from upcycle.convert.families import describe_dense
        from upcycle.convert.source import DenseSource

        source = DenseSource.open(folder)
        dense = describe_dense(source.config, source.tensors)
        num_layers, hidden = dense.num_layers, dense.hidden_size
        generator = torch.Generator().manual_seed(seed)
        if mode == "random":
            drawn = torch.randn((num_layers, count, hidden), generator=generator)
        else:
            scale = math.sqrt(1.0 / hidden)
            drawn = torch.rand((num_layers, count, hidden), generator=generator) * 2 * scale - scale
        return {layer: drawn[layer] for layer in layers}
    if mode == "hidden":
        from upcycle.convert.router_prompts import prompt_rows

        return prompt_rows(folder, prompts, layers)
    rows = _cheap_embed_rows(folder, prompts)
    return {layer: rows.clone() for layer in layers}


def _cheap_embed_rows(folder: Path, prompts: list) -> torch.Tensor:
    from transformers import AutoTokenizer

    from upcycle.convert.source import DenseSource

    source = DenseSource.open(folder)
    names = [name for name in source.tensors if EMBEDDING.search(name)]
    if len(names) != 1:
        raise UnsupportedModelError(
            f"gate_mode cheap_embed reads the token embeddings, and {folder.name} has no single embed_tokens tensor.",
            "use gate_mode: hidden or random.",
        )
    embed = source.read(names[0]).float()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def embedded(texts: list[str]) -> torch.Tensor:
        total = torch.zeros(embed.shape[1])
        for text in texts:
            ids = tokenizer((tokenizer.bos_token or "") + text, add_special_tokens=False)["input_ids"]
            total += embed[torch.tensor(ids)].sum(dim=0)
        return total / total.norm().clamp(min=1e-8)

    rows = []
    for positive, negative in prompts:
        row = embedded(positive) - (embedded(negative) if negative else 0)
        rows.append(row / row.norm().clamp(min=1e-8))
    return torch.stack(rows)
