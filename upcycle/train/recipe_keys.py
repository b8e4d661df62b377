"""The recipe's keys, and the nearest valid key when a user writes one that does not exist.

A mistyped key must stop the run with a useful suggestion: a typo within its section, the same name in another
section, or the name another trainer uses for it (``learning_rate`` is ``optim.lr`` here).
"""

from __future__ import annotations

import difflib
from functools import cache

from upcycle.errors import OptionError
from upcycle.train.recipe_sections import SECTIONS
from upcycle.validation import nested_model

# Names other trainers use (HF Trainer, torchtitan, Megatron), which difflib alone would match poorly.
ALIASES = {
    "learning_rate": "optim.lr",
    "max_lr": "optim.lr",
    "peak_lr": "optim.lr",
    "lr_min": "optim.min_lr",
    "warmup": "optim.warmup_steps",
    "lr_scheduler_type": "optim.schedule",
    "max_grad_norm": "optim.grad_clip",
    "clip_grad": "optim.grad_clip",
    "max_norm": "optim.grad_clip",
    "max_steps": "batch.steps",
    "train_steps": "batch.steps",
    "batch_size": "batch.micro_batch_size",
    "per_device_train_batch_size": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum",
    "global_batch_size": "batch.global_batch_tokens",
    "block_size": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "seq_length": "data.seq_len",
    "context_length": "data.seq_len",
    "router_aux_loss_coef": "moe.aux_loss_coef",
    "load_balancing_loss_coef": "moe.aux_loss_coef",
    "router_z_loss_coef": "moe.z_loss_coef",
    "out": "run.output_dir",
    "output": "run.output_dir",
    "dtype": "run.precision",
    "mixed_precision": "run.precision",
    "name": "model.path",
    "data_parallel_shard_degree": "parallel.fsdp",
    "fsdp_size": "parallel.fsdp",
    "expert_parallel_degree": "parallel.ep",
    "expert_model_parallel_size": "parallel.ep",
    "ep_size": "parallel.ep",
    "data_parallel_replicate_degree": "parallel.replicate",
    "tensor_parallel_degree": "parallel.tp",
    "tensor_model_parallel_size": "parallel.tp",
    "tp_size": "parallel.tp",
}


def unknown_key(key: str, known: list[str], section: str | None, origin: str = "") -> OptionError:
    """An unknown key, with the nearest valid key: a typo in its section, or the same name in another one."""
    leaf = key.rsplit(".", 1)[-1]
    every = dotted_keys()
    suggestion = difflib.get_close_matches(leaf, known, n=1)
    if leaf in ALIASES:
        guess: str | None = ALIASES[leaf]
    elif suggestion:
        guess = f"{section}.{suggestion[0]}" if section else suggestion[0]
    else:
        elsewhere = [k for k in every if k.rsplit(".", 1)[-1] == leaf]
        guess = elsewhere[0] if elsewhere else next(iter(difflib.get_close_matches(key, every, n=1)), None)
    hint = f" (did you mean {guess}?)" if guess else ""
    where = f"in {section}" if section else "at the top level"
    return OptionError(
        f"unknown key {key}{origin}{hint}.", f"remove it, or use a key valid {where}: {', '.join(known)}."
    )


@cache
def dotted_keys() -> list[str]:
    """Every settable key, nested sections included (``model.upcycle.experts``)."""
    return [key for name, cls in SECTIONS.items() for key in _keys_of(cls, name)]


def _keys_of(cls: type, prefix: str) -> list[str]:
    keys = []
    for name in cls.__pydantic_fields__:  # type: ignore[attr-defined]
        nested = nested_model(cls, name)
        keys += _keys_of(nested, f"{prefix}.{name}") if nested is not None else [f"{prefix}.{name}"]
    return keys
