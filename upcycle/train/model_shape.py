"""The shape of a model without its weights: built on the meta device from config.json, nothing read or allocated.

The layout check (how many experts to place) and the memory plan (bytes per rank) both need the parameter counts
of every part of the model; reading them off the real module tree works for every class transformers ships, where
config keys differ from family to family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from upcycle.hf.moe_modules import decoder_layers, moe_blocks


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: its parameter counts and the widths its activations have."""

    dense_params: int  # attention, norms, router, shared or dense MLP
    expert_params: int  # routed experts, all of them
    hidden: int
    q_width: int
    kv_width: int
    mlp_width: int  # intermediate size of one routed expert, or of the dense MLP
    num_experts: int  # 0 for a dense layer
    top_k: int


@dataclass(frozen=True)
class ModelShape:
    layers: tuple[LayerShape, ...]
    embed_params: int
    head_params: int  # 0 when the output head is tied to the embedding
    other_params: int  # final norm and anything outside the layers, embedding and head
    vocab: int
    hidden: int

    @property
    def num_experts(self) -> int:
        return max((layer.num_experts for layer in self.layers), default=0)

    @property
    def total_params(self) -> int:
        layers = sum(layer.dense_params + layer.expert_params for layer in self.layers)
        return layers + self.embed_params + self.head_params + self.other_params

    @property
    def expert_params(self) -> int:
        return sum(layer.expert_params for layer in self.layers)


def meta_model(folder: Path | str, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: every shape, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_shape(model: nn.Module) -> ModelShape:
    """Parameter counts by part, read from a (meta or real) model; shared parameters are counted once."""
    seen: set[int] = set()

    def count(module: nn.Module) -> int:
        total = 0
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
        return total

    embed = model.get_input_embeddings()
    embed_params = count(embed)
    head = model.get_output_embeddings()
    head_params = count(head) if head is not None else 0
    blocks = dict(moe_blocks(model))
    layers = []
    for layer in decoder_layers(model) or []:
        block = next((b for b in blocks.values() if any(b is m for m in layer.modules())), None)
        experts = getattr(block, "experts", None)
        expert_params = count(experts) if experts is not None else 0  # counted first: count(layer) is the rest
        layers.append(_layer_shape(layer, count(layer), expert_params, experts, block))
    other = count(model)
    vocab, hidden = embed.weight.shape
    return ModelShape(tuple(layers), embed_params, head_params, other, int(vocab), int(hidden))


def _layer_shape(
    layer: nn.Module, dense_params: int, expert_params: int, experts: nn.Module | None, block: nn.Module | None
) -> LayerShape:
    linears = {name.rsplit(".", 1)[-1]: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    q = linears.get("q_proj") or linears.get("qkv_proj") or linears.get("Wqkv")
    k = linears.get("k_proj")
    hidden = next(iter(layer.parameters())).shape[-1] if q is None else q.in_features
    q_width = q.out_features if q is not None else hidden
    kv_width = k.out_features if k is not None else q_width
    num_experts, top_k, mlp_width = 0, 1, 0
    if experts is not None:
        shapes = [p.shape for p in experts.parameters(recurse=False) if p.dim() == 3]
        num_experts = int(getattr(experts, "num_experts", shapes[0][0] if shapes else 0))
        widths = [s[1] if s[2] == hidden else s[2] for s in shapes if s[1] != s[2] or s[1] != hidden]
        mlp_width = min(widths) if widths else hidden
        top_k = int(getattr(block, "top_k", None) or getattr(getattr(block, "gate", None), "top_k", 1) or 1)
    else:
        ups = [m.out_features for n, m in linears.items() if n in {"up_proj", "gate_up_proj", "fc1", "w1"}]
        mlp_width = min(ups) if ups else 4 * hidden
    return LayerShape(
        dense_params,
        expert_params,
        int(hidden),
        int(q_width),
        int(kv_width),
        int(mlp_width),
        num_experts,
        top_k,
    )
