"""Glm4-MoE and Dots1: group-limited routing, which keeps every shard of a virtual group together.

With n_group = E copies, topk_group = k/G and tied router rows, a token takes whole copies; the
renormalised weights then sum to 1/G per copy, which routed_scaling_factor = G restores exactly.
"""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, expert_width, window_fields
from upcycle.convert.tensor_recipe import TensorRecipe


class GroupLimitedTarget(Target):
    router_fp32 = True
    shared_expert = "plain"
    per_layer_windows = False  # whether the class reads layer_types (one window for some layers, full for others)

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if dense.has_windows and not self.per_layer_windows:
            return f"{self.architecture} has no sliding-window attention, which this model uses"
        if opts.router != "renorm":
            return f"{self.architecture} scores experts with a sigmoid, so only the renormalised router is exact"
        if opts.granularity < 2:
            return f"{self.architecture}'s group score needs at least two experts per group (use -g 2 or more)"
        first_moe = layout.moe_layers[0]
        if layout.moe_layers != tuple(range(first_moe, layout.num_layers)):
            return (
                f"{self.architecture} can keep only the first layers dense (first_k_dense_replace); "
                "choose --layers as a range that runs to the last layer"
            )
        if (dense.intermediate_size - opts.shared_width) % opts.granularity:
            return (
                f"the intermediate size {dense.intermediate_size} does not split into {opts.granularity} equal shards"
            )
        return None

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "moe_intermediate_size": expert_width(dense, opts),
            "n_routed_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "n_group": opts.experts,
            "topk_group": opts.top_k // opts.granularity,
            "norm_topk_prob": True,
            "routed_scaling_factor": float(opts.granularity),
            "n_shared_experts": opts.shared_width // expert_width(dense, opts),
            "first_k_dense_replace": layout.moe_layers[0],
        }

    def output_scale(self, opts: UpcycleOptions) -> float:
        return float(opts.granularity)

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        prefix = f"model.layers.{layer}.mlp."
        hidden = dense.hidden_size
        bias = TensorRecipe(prefix + "gate.e_score_correction_bias", (opts.num_experts,), "F32", "zeros", layer=layer)
        if opts.shared_width:  # the plan makes the shared experts from the dense MLP
            return [bias]
        return [
            bias,
            TensorRecipe(prefix + "shared_experts.gate_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_experts.up_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_experts.down_proj.weight", (hidden, 0), dtype, "zeros", layer=layer),
        ]

    def shared_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_experts.{projection}_proj.weight"


class Glm4MoeTarget(GroupLimitedTarget):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    model_type = "glm4_moe"
    qkv_bias = True

    def rope_parameters(self, dense: DenseModel) -> dict:
        parameters = dense.rope_parameters()
        parameters["partial_rotary_factor"] = 1.0  # Glm4-MoE defaults to half-width rotary; the source rotates all
        return parameters

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = super().moe_config(dense, opts, layout)
        cfg.update(
            attention_bias=dense.traits.qkv_bias,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
        )
        return cfg


class Dots1Target(GroupLimitedTarget):
    name = "dots1"
    architecture = "Dots1ForCausalLM"
    model_type = "dots1"
    qk_norms = frozenset({"head"})
    per_layer_windows = True

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = super().moe_config(dense, opts, layout)
        cfg.update(attention_bias=False, **window_fields(dense))
        return cfg
