"""Loading a causal LM through plain transformers, refusing silent random initialisation.

`from_pretrained` fills any missing tensor with random values and only logs it; every load in upcycle goes
through here so a checkpoint that does not match its class is an error, not a quietly different model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.errors import OptionError, SourceError
from upcycle.model_files import check_model_folder

TORCH_DTYPES = {  # the dtypes a user may name for loading or computing, by name
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_named(name: str, option: str = "--dtype") -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise OptionError(f"unknown {option} {name!r}.", f"choose one of {', '.join(TORCH_DTYPES)}.")
    return TORCH_DTYPES[name]


def load_causal_lm(
    folder: Path | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **options: Any
) -> tuple[nn.Module, list[str]]:
    """The model and a list of loading problems (missing, unexpected or mismatched keys); empty when clean.

    `options` go to `from_pretrained` (e.g. a `distributed_config` that shards the model while it loads).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    check_model_folder(folder)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **options
    )
    problems = [f"{kind}: {', '.join(sorted(keys)[:3])}" for kind, keys in info.items() if keys]
    return model, problems


def random_causal_lm(
    folder: Path | str, seed: int, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> nn.Module:
    """The folder's architecture with fresh weights, drawn on the CPU by the class's own initialisation from `seed`:
    the same weights in every process that asks with the same seed. The global RNG is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_causal_lm_strict(
    folder: Path | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **options: Any
) -> nn.Module:
    model, problems = load_causal_lm(folder, dtype, trust_remote_code, **options)
    if problems:
        raise SourceError(
            f"{folder} does not load cleanly in transformers ({'; '.join(problems)}).",
            "re-create the checkpoint; upcycle never trains or compares a partly random model.",
        )
    return model
