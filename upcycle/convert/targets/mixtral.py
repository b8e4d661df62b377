"""Mixtral: Llama-form attention without biases or q/k norms, the renormalised router on every layer."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, uniform_window_problem


class MixtralTarget(Target):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    moe_prefix = "block_sparse_moe"
    expert_names = {"gate": "w1", "up": "w3", "down": "w2"}
    rounds_routing_weights = False  # Mixtral combines with fp32 routing weights

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router != "renorm":
            return "Mixtral always renormalises the top-k weights (use qwen2_moe for softmax-topk)"
        if opts.granularity > 1:
            return "Mixtral has no group-limited routing for virtual groups (use glm4_moe)"
        if not layout.all_moe:
            return "every Mixtral layer is sparse, so no layer can stay dense (use qwen2_moe)"
        return uniform_window_problem(dense, "Mixtral")

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "num_local_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "sliding_window": dense.sliding_window,
            "router_aux_loss_coef": 0.01,
            "router_jitter_noise": 0.0,
        }
