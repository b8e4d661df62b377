"""Qwen2-MoE and Qwen3-MoE: softmax-topk routers, layers kept dense, and the Qwen families' own attention."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, expert_width, uniform_window_problem, window_fields
from upcycle.convert.tensor_recipe import TensorRecipe


def _routing(dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
    return {
        "intermediate_size": dense.intermediate_size,
        "moe_intermediate_size": expert_width(dense, opts),
        "num_experts": opts.num_experts,  # never also num_local_experts: Qwen3-MoE maps one onto the other
        "num_experts_per_tok": opts.top_k,
        "norm_topk_prob": opts.router == "renorm",
        "decoder_sparse_step": 1,
        "mlp_only_layers": layout.dense_layers,
        "router_aux_loss_coef": 0.01,
    }


class Qwen2MoeTarget(Target):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"
    qkv_bias = True
    shared_expert = "gated"

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.granularity > 1:
            return "Qwen2-MoE has no group-limited routing, so virtual groups could split (use glm4_moe)"
        if dense.has_windows:
            return (
                "Qwen2-MoE's attention windows only through its mask and does not pass the window to the attention "
                "kernel, so under flash-attention it would attend to every key where this model slides"
            )
        return None

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = _routing(dense, opts, layout)
        cfg.update(
            qkv_bias=dense.traits.qkv_bias,
            shared_expert_intermediate_size=opts.shared_width,  # zero wide (the default) it adds nothing
            **window_fields(dense),
        )
        return cfg

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        prefix = f"model.layers.{layer}.mlp."
        hidden = dense.hidden_size
        gate = TensorRecipe(prefix + "shared_expert_gate.weight", (1, hidden), dtype, "zeros", layer=layer)
        if opts.shared_width:  # the plan makes the shared expert from the dense MLP; its gate stays zero
            return [gate]
        return [
            TensorRecipe(prefix + "shared_expert.gate_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_expert.up_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_expert.down_proj.weight", (hidden, 0), dtype, "zeros", layer=layer),
            gate,
        ]

    def shared_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}_proj.weight"


class Qwen3MoeTarget(Target):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    qk_norms = frozenset({"head"})

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.granularity > 1:
            return "Qwen3-MoE has no group-limited routing, so virtual groups could split (use dots1)"
        return uniform_window_problem(dense, "Qwen3-MoE")

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = _routing(dense, opts, layout)
        window = dense.sliding_window
        cfg.update(attention_bias=False, use_sliding_window=window is not None, sliding_window=window)
        return cfg
