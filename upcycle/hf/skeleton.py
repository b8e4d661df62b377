"""transformers models built from a config on the meta device, then given real weights one piece at a time.

The probe (config check) and the streaming function check both run transformers' own classes without ever
holding a whole model: the skeleton costs no memory, rotary tables are recomputed from the config, and
parameters are assigned per module just before they are needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from upcycle.hf.moe_modules import decoder_layers as find_decoder_layers


class SkeletonError(Exception):
    """transformers cannot build the model, or the model has a structure these helpers do not know."""


def meta_model(config: Any, attn_implementation: str, experts_implementation: str | None = None) -> nn.Module:
    """The causal LM transformers builds from `config`, on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except Exception as error:  # transformers raises many kinds for configs it cannot build
        raise SkeletonError(
            f"transformers cannot build a model from this config ({type(error).__name__}: {error})"
        ) from None
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = find_decoder_layers(model)
    if layers is None:
        raise SkeletonError(f"{type(model).__name__} keeps no list of decoder layers where upcycle can reach it")
    return layers


def rebuild_rotary(model: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Rotary modules rebuilt from their config on `device`: their tables are computed, never loaded."""
    names = []
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        try:
            with torch.device(device):
                fresh = type(module)(getattr(module, "config", None) or model.config)
        except Exception as error:
            raise SkeletonError(f"cannot rebuild {type(module).__name__} ({error})") from None
        replace_module(model, name, fresh)
        names.append(name)
    return names


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def meta_buffers(module: nn.Module) -> list[str]:
    """Buffers still on the meta device: state the module needs from a checkpoint (or cannot run)."""
    return [name for name, buffer in module.named_buffers() if buffer is not None and buffer.device.type == "meta"]


@contextmanager
def assigned(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Give `module` the parameters and buffers named in `tensors` (names relative to it) for the duration of the
    block, then put the meta placeholders back, so the memory goes when the caller drops its references."""
    previous: list[tuple[dict, str, torch.Tensor | None]] = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr in owner._parameters:
                previous.append((owner._parameters, attr, owner._parameters[attr]))
                owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                previous.append((owner._buffers, attr, owner._buffers[attr]))
                owner._buffers[attr] = tensor
        yield module
    finally:
        for store, attr, placeholder in reversed(previous):
            store[attr] = placeholder
