"""The probe's attention and mask functions, registered with transformers under one name, and the sampling of
masks and rotary tables far beyond the probe's short sequence: what the config probe records of each layer's
attention besides its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PROBE_IMPLEMENTATION = "upcycle_probe"


PROBE_TOKENS = 16  # the functional probe's sequence; longer windows are checked on the mask functions


MASK_HORIZON = 1 << 21  # query positions sampled up to here (2M tokens), and every window of either config


# Arguments that reach the attention call but do not change what it computes at inference.
IGNORED_ATTENTION_KWARGS = {
    "dropout", "position_ids", "cache_position", "output_attentions", "use_cache", "output_router_logits",
    "return_dict", "output_hidden_states", "past_key_values", "past_key_value", "logits_to_keep",
}  # fmt: skip


class ProbeError(Exception):
    """The config cannot be probed: transformers does not know it, or its model has an unknown structure."""


_ACTIVE: list[Recorder] = []


class Recorder:
    """Collects what each attention call received: shapes, kwargs and the function that built its mask."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.mask_functions: dict[int, Callable] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.remove(self)


def _probe_mask(*args: Any, mask_function: Callable | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' own sdpa mask, always materialised, remembered with the function that defines it."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(*args, mask_function=mask_function, **kwargs)
    if mask is None:
        raise ProbeError("transformers built no attention mask for the probe")
    if _ACTIVE:
        _ACTIVE[-1].mask_functions[id(mask)] = mask_function
    return mask


def _probe_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Plain softmax attention over the given mask, recording what the module asked for."""
    recorder = _ACTIVE[-1]
    if attention_mask is None or id(attention_mask) not in recorder.mask_functions:
        raise ProbeError(f"{type(module).__name__} attends with a mask transformers' mask functions did not build")
    params = sorted(part for name, _ in module.named_parameters() for part in unfused_names(name))
    record: dict[str, Any] = {
        "heads": int(query.shape[1]),
        "kv_heads": int(key.shape[1]),
        "head_dim": int(query.shape[-1]),
        "value_dim": int(value.shape[-1]),
        "parameters": params,
        "mask_function": recorder.mask_functions[id(attention_mask)],
    }
    for name, value_ in sorted(kwargs.items()):
        if name in IGNORED_ATTENTION_KWARGS:
            continue
        if isinstance(value_, torch.Tensor):
            record[name] = f"tensor{list(value_.shape)}"
        elif value_ is not None:
            record[name] = value_
    recorder.calls.append(record)
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling")
    )
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register_probe() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention)
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, _probe_mask)
    _REGISTERED = True


# A fused [q; k; v] projection computes what three separate ones do: it is named by its parts, and its stand-in is
# the parts' stand-ins stacked, so a model that fuses them probes the same as one that does not.
FUSED_QKV = ("qkv_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"))


def unfused_names(name: str) -> list[str]:
    fused, parts = FUSED_QKV
    if name.endswith(fused):
        prefix = name[: -len(fused)]
        return [prefix + part for part in parts]
    return [name]


def window_fields(cfg: Any) -> set[int]:
    """Every window- or chunk-like length in a config, so the positions around it are sampled."""
    found = set()
    for key, value in cfg.to_dict().items():
        if ("window" in key or "chunk" in key) and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return found


def mask_positions(windows: set[int], horizon: int) -> list[int]:
    positions = set(range(PROBE_TOKENS))
    top = min(MASK_HORIZON, max(2 * horizon, 2 * PROBE_TOKENS))
    k = 1
    while k <= top:
        positions |= {k - 1, k, k + 1}
        k *= 2
    for w in windows:
        positions |= {w - 1, w, w + 1, 2 * w, 2 * w + 1}
    return sorted(p for p in positions if p >= 0)


def sample_mask_rows(mask_function: Callable, positions: list[int]) -> dict[int, tuple[tuple[int, int], ...]]:
    """For each query position, the key ranges it may attend to (keys up to one past the query are tested)."""
    zero = torch.tensor(0)
    rows = {}
    for q in positions:
        kv = torch.arange(q + 2)
        allowed = torch.as_tensor(mask_function(zero, zero, torch.tensor(q), kv)).expand(q + 2).to(torch.int8)
        edges = torch.nonzero(torch.diff(allowed, prepend=allowed.new_zeros(1), append=allowed.new_zeros(1)))
        bounds = edges.flatten().tolist()
        rows[q] = tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2))
    return rows


def rope_probe_lengths(cfg: Any, horizon: int) -> list[int]:
    """Sequence lengths at which rotary tables are compared: dynamic and long-context types switch on them."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    lengths = {PROBE_TOKENS, horizon, horizon + 1, 2 * horizon}
    if original:
        lengths |= {int(original), int(original) + 1}
    return sorted(n for n in lengths if n > 0)


def rotary_tables(model: nn.Module, names: list[str], lengths: list[int]) -> dict[str, list]:
    tables: dict[str, list] = {}
    for name in names:
        module = type(model.get_submodule(name))(getattr(model.get_submodule(name), "config", None) or model.config)
        x = torch.zeros(1, 1, 1)
        rows = []
        for length in lengths:
            positions = sorted(
                {p for p in [0, 1, 2, 3, PROBE_TOKENS - 1] + [2**k - 1 for k in range(40)] if p < length} | {length - 1}
            )
            with torch.no_grad():
                cos, sin = module(x, torch.tensor([positions]))
            rows.append((cos[0].clone(), sin[0].clone()))
        tables[name] = rows
    return tables
