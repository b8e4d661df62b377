"""Finding the parts of a transformers model: its decoder layers and its sparse (MoE) blocks, in any class."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder layers (model.model.layers in every causal LM transformers ships), or None."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def is_moe_block(module: nn.Module) -> bool:
    """A sparse block: a module holding `experts` beside a router module (`gate`, or `router`)."""
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None) or getattr(module, "router", None)
    return isinstance(experts, nn.Module) and isinstance(router, nn.Module)


def moe_block_of(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's sparse block, whatever the class calls it (`mlp`, `block_sparse_moe`, `feed_forward`)."""
    return next((child for _, child in layer.named_children() if is_moe_block(child)), None)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if is_moe_block(module)]


def router_of(block: nn.Module) -> nn.Module:
    return getattr(block, "gate", None) or block.router
