"""Cohere2-MoE: Cohere 2's parallel decoder layer with per-layer windows; any layer may stay dense.

Its softmax runs over the k selected logits only, so the weights always sum to 1 (renormalised router only).
"""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem


class Cohere2MoeTarget(Target):
    name = "cohere2_moe"
    architecture = "Cohere2MoeForCausalLM"
    model_type = "cohere2_moe"
    blocks = frozenset({"cohere2"})
    qkv_bias = True
    o_bias = True

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router != "renorm":
            return "Cohere2-MoE's softmax covers only the selected experts, so only the renormalised router is exact"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        moe = set(layout.moe_layers)
        cfg = dense.resolved
        return {
            "intermediate_size": dense.intermediate_size,
            "prefix_dense_intermediate_size": dense.intermediate_size,
            "num_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "num_shared_experts": 0,
            "expert_selection_fn": "softmax",
            "norm_topk_prob": True,
            "mlp_layer_types": ["sparse" if i in moe else "dense" for i in range(dense.num_layers)],
            "prefix_dense_sliding_window_pattern": 0,  # 1 would rotate dense full-attention layers too
            "layer_types": list(cfg["layer_types"]),
            "sliding_window": cfg.get("sliding_window"),
            "layer_norm_eps": cfg.get("layer_norm_eps"),
            "logit_scale": cfg.get("logit_scale"),
            "attention_bias": dense.traits.qkv_bias,
            "rms_norm_eps": None,  # a value would switch the class to RMSNorm
            "router_aux_loss_coef": 0.01,
        }
