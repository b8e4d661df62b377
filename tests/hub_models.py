"""Tiny random dense checkpoints whose config.json is written exactly as given (hub style: legacy rope fields,
absent optional fields), with weights shaped by what transformers makes of that config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from upcycle.hf_config import load_config


def save_hub_style(config_json: dict, folder: Path, seed: int = 0) -> Path:
    """Build the model transformers builds from `config_json`, save its weights, keep config.json verbatim."""
    config = load_config(config_json)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(std=0.1)
            else:
                param.normal_(std=0.08)
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
