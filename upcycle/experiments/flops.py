"""FLOPs per training token, from a model's configuration alone: the one rule every comparison and benchmark uses.

Held-out loss at equal FLOPs, TFLOP/s and MFU all rest on this count, so it lives in one place and is computed
from the configuration (the model built on the meta device, nothing loaded) for any architecture transformers
can build, dense or MoE.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

FLOPS_FORMULA = (
    "FLOPs/token = 6 x N_active + 12 x layers x (heads x head_dim) x seq_len  "
    "(N_active: attention, router, dense MLP or top-k experts' MLPs, LM head; no embedding lookup)"
)


@dataclass(frozen=True)
class ModelCost:
    """A model's parameter counts and the shape its attention FLOPs depend on."""

    total_params: int
    active_params: int  # weight-matrix parameters a token uses (see FLOPS_FORMULA)
    layers: int
    attn_width: int  # heads x head_dim
    experts: int  # routed experts per MoE layer (0 for a dense model)
    top_k: int
    architecture: str

    def flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per training token at ``seq_len`` (:data:`FLOPS_FORMULA`)."""
        return 6.0 * self.active_params + 12.0 * self.layers * self.attn_width * seq_len


def model_cost(model_dir: Path | str) -> ModelCost:
    """Parameter counts from the configuration alone (the model is built on the meta device, nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from upcycle.hf.moe_modules import moe_blocks, router_of

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # zeroed shared experts
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    fraction: dict[int, float] = {}  # id(expert parameter) -> the share of it a token uses (k / E)
    experts = top_k = 0
    for _, module in moe_blocks(model):
        gate = router_of(module)
        weight = getattr(gate, "weight", None)
        n = int(weight.shape[0]) if weight is not None else int(getattr(config, "num_experts", 0) or 0)
        k = int(getattr(config, "num_experts_per_tok", 0) or getattr(gate, "top_k", 0) or 1)
        experts, top_k = n, k
        for p in module.experts.parameters():
            fraction[id(p)] = k / n if n else 1.0
    total = active = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.ndim < 2:
            continue  # norms, biases, score-correction biases: negligible FLOPs
        if p is embed and (head_weight is None or head_weight is not embed):
            continue  # an untied input embedding is a lookup, not a matmul
        active += round(p.numel() * fraction.get(id(p), 1.0))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelCost(
        total_params=total,
        active_params=active,
        layers=int(config.num_hidden_layers),
        attn_width=heads * head_dim,
        experts=experts,
        top_k=top_k,
        architecture=type(model).__name__,
    )
