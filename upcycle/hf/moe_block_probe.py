"""Does a grown MoE block compute what the original computes? Asked of transformers' own block classes.

Both configs build their first MoE block (at small widths, the same for both: routing does not depend on them),
the original with seeded random weights, the grown one with every expert-indexed tensor repeated m times along
the expert axis (new expert j = old j // m). Both run the same tokens in float64 (routing weights in float32, as
the classes compute them). Nothing here reads upcycle's growing code: the check stands on the configs and on
transformers alone.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from upcycle.hf.config import load_config
from upcycle.hf.moe_modules import moe_blocks
from upcycle.hf.skeleton import SkeletonError, meta_model

# Relative. The classes compute routing weights in float32 whatever the block's dtype, over m times as many
# terms when grown: correct growths measure 6e-8 to 7e-7 (m = 2 and 4, nine classes); a wrong one measures ~0.7.
TOLERANCE = 1e-5
_TOKENS = 1024
# Widths every MoE config names; shrunk alike in both configs so the probe costs milliseconds.
_SMALL_WIDTHS = {
    "hidden_size": 32,
    "intermediate_size": 24,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
}


@dataclass
class BlockProbe:
    equivalent: bool
    relative_difference: float
    block: str  # the block class probed
    problem: str = ""  # why no comparison could be made


def probe_grown_block(config: dict, grown: dict, factor: int, tied_groups: int = 0, seed: int = 0) -> BlockProbe:
    """Run the first MoE block of `config` and of `grown` on the same tokens; the grown block's expert tensors are
    the original's repeated `factor` times. With `tied_groups`, the original's router rows and biases are the same
    within each of that many groups (the weights a growth of virtual groups starts from)."""
    try:
        original, name = _small_block(config)
        bigger, _ = _small_block(grown)
    except SkeletonError as error:
        return BlockProbe(False, float("inf"), "", str(error))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in original.state_dict().items():
        random = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        if key.split(".")[0] in ("gate", "router"):  # logits of unit scale, biases small: varied choices per token
            random = random / _SMALL_WIDTHS["hidden_size"] ** 0.5 if value.dim() > 1 else random * 0.1
        if tied_groups and key.split(".")[0] in ("gate", "router"):
            random = (
                random.reshape(tied_groups, -1, *value.shape[1:])[:, :1]
                .expand(tied_groups, value.shape[0] // tied_groups, *value.shape[1:])
                .reshape(value.shape)
            )
        state[key] = random if value.is_floating_point() else value
    original.load_state_dict(state)
    try:
        bigger.load_state_dict(_repeated(state, bigger.state_dict(), factor))
    except ValueError as error:
        return BlockProbe(False, float("inf"), name, str(error))
    x = torch.randn(1, _TOKENS, _SMALL_WIDTHS["hidden_size"], generator=generator, dtype=torch.float64)
    with torch.no_grad():
        try:
            a = _output(original(x))
        except Exception as error:  # a config its own class cannot run: nothing to compare against
            return BlockProbe(False, float("inf"), name, f"transformers cannot run the original block ({error})")
        try:
            b = _output(bigger(x))
        except Exception as error:
            return BlockProbe(False, float("inf"), name, f"transformers cannot run the grown block ({error})")
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    relative = diff / scale if scale else diff
    return BlockProbe(relative <= TOLERANCE, relative, name)


def _small_block(config: dict) -> tuple[nn.Module, str]:
    """The first MoE block the config builds, at the small widths, in float64 on the CPU."""
    small = copy.deepcopy(config)
    for key, width in _SMALL_WIDTHS.items():
        if isinstance(small.get(key), int):
            small[key] = width
    cfg = load_config(small)
    skeleton = meta_model(cfg, "eager")
    blocks = moe_blocks(skeleton)
    if not blocks:
        raise SkeletonError(f"transformers builds no MoE block from this {config.get('model_type')} config")
    cls = type(blocks[0][1])
    kwargs: dict[str, Any] = {}
    if "layer_idx" in inspect.signature(cls.__init__).parameters:
        kwargs["layer_idx"] = _layer_index(blocks[0][0])
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text_cfg._experts_implementation = "eager"  # the reference loop: float64, and no kernel of upcycle's
    block = cls(text_cfg, **kwargs).to(torch.float64).eval()
    return block, cls.__name__


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), 0)


def _repeated(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], factor: int) -> dict:
    """The original's tensors in the grown block's shapes: equal shapes copied, expert axes repeated."""
    grown = {}
    for key, want in target.items():
        have = state.get(key)
        if have is None:
            raise ValueError(f"the grown block has {key}, which the original lacks")
        if have.shape == want.shape:
            grown[key] = have
        elif have.dim() and have.shape[0] * factor == want.shape[0] and have.shape[1:] == want.shape[1:]:
            grown[key] = have.repeat_interleave(factor, dim=0)
        else:
            raise ValueError(f"{key} is {list(have.shape)} in the original and {list(want.shape)} grown")
    return grown


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
