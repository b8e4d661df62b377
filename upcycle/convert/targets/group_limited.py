"""Glm4-MoE and Dots1: group-limited routing, which keeps every shard of a virtual group together.

With n_group = E copies, topk_group = k/G and tied router rows, a token takes whole copies; the
renormalised weights then sum to 1/G per copy, which routed_scaling_factor = G restores exactly.
"""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.recipe import TensorRecipe
from upcycle.convert.targets.base import Layout, Target


class GroupLimitedTarget(Target):
    router_fp32 = True
    needs_qk_norm = False

    def why_not(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if dense.qk_norm != self.needs_qk_norm:
            other = "dots1" if dense.qk_norm else "glm4_moe"
            return (
                f"{self.architecture} attention {'needs' if self.needs_qk_norm else 'has no'} q/k norms "
                f"(use {other} for this {dense.family} model)"
            )
        if dense.sliding_window is not None:
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
        if dense.intermediate_size % opts.granularity:
            return (
                f"the intermediate size {dense.intermediate_size} does not split into {opts.granularity} equal shards"
            )
        return None

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "moe_intermediate_size": dense.intermediate_size // opts.granularity,
            "n_routed_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "n_group": opts.experts,
            "topk_group": opts.top_k // opts.granularity,
            "norm_topk_prob": True,
            "routed_scaling_factor": float(opts.granularity),
            "n_shared_experts": 0,
            "first_k_dense_replace": layout.moe_layers[0],
        }

    def output_scale(self, opts: UpcycleOptions) -> float:
        return float(opts.granularity)

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        prefix = f"model.layers.{layer}.mlp."
        hidden = dense.hidden_size
        return [
            TensorRecipe(prefix + "gate.e_score_correction_bias", (opts.num_experts,), "F32", "zeros", layer=layer),
            TensorRecipe(prefix + "shared_experts.gate_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_experts.up_proj.weight", (0, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "shared_experts.down_proj.weight", (hidden, 0), dtype, "zeros", layer=layer),
        ]


class Glm4MoeTarget(GroupLimitedTarget):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    model_type = "glm4_moe"

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = super().moe_config(dense, opts, layout)
        rope = dense.rope_fields()
        parameters = dict(rope.get("rope_parameters") or {"rope_type": "default", "rope_theta": rope["rope_theta"]})
        if "rope_scaling" in rope:
            parameters.update(rope["rope_scaling"])
            parameters["rope_type"] = rope["rope_scaling"].get("rope_type", rope["rope_scaling"].get("type"))
        parameters["partial_rotary_factor"] = 1.0  # Glm4-MoE defaults to half-width rotary; Llama rotates all
        cfg.update(
            rope_parameters=parameters,
            attention_bias=dense.qkv_bias,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
        )
        return cfg


class Dots1Target(GroupLimitedTarget):
    name = "dots1"
    architecture = "Dots1ForCausalLM"
    model_type = "dots1"
    needs_qk_norm = True

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        cfg = super().moe_config(dense, opts, layout)
        cfg.update(
            attention_bias=False,
            sliding_window=None,
            use_sliding_window=False,
            layer_types=["full_attention"] * dense.num_layers,
        )
        return cfg
