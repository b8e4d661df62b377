"""Tiny random dense checkpoints whose config.json is written exactly as given (hub style: legacy rope fields,
absent optional fields), with weights shaped by what transformers makes of that config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tiny_models import randomize

from upcycle.hf_config import load_config

# The rotary settings of every Llama 3.x config on the hub (pre-v5 form), with a tiny original context.
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def save_hub_style(config_json: dict, folder: Path, seed: int = 0) -> Path:
    """Build the model transformers builds from `config_json`, save its weights, keep config.json verbatim."""
    config = load_config(config_json)
    torch.manual_seed(seed)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading {folder} reported {problems}"
    with torch.no_grad():
        return model.eval()(ids).logits


def relative_difference(dense: Path, moe: Path, length: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    a, b = logits(dense, ids), logits(moe, ids)
    return ((a - b).abs().max() / a.abs().max()).item()
