"""Ernie 4.5 MoE: Ernie 4.5's decoder layer; the router always renormalises (softmax, top-k with a score bias)."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem
from upcycle.convert.tensor_recipe import TensorRecipe


class Ernie45MoeTarget(Target):
    name = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    model_type = "ernie4_5_moe"
    blocks = frozenset({"ernie4_5"})
    router_fp32 = True

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router != "renorm":
            return "Ernie4_5_Moe always renormalises the top-k weights, so only the renormalised router is exact"
        first, last = layout.moe_layers[0], layout.moe_layers[-1]
        if layout.moe_layers != tuple(range(first, last + 1)):
            return "Ernie4_5_Moe makes one contiguous run of layers sparse; choose --layers as a range"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "moe_intermediate_size": dense.intermediate_size,
            "moe_num_experts": opts.num_experts,
            "moe_k": opts.top_k,
            "moe_num_shared_experts": 0,
            "moe_layer_start_index": layout.moe_layers[0],
            "moe_layer_end_index": layout.moe_layers[-1],
            "moe_layer_interval": 1,
            "use_bias": False,
            "router_aux_loss_coef": 0.01,
        }

    def checkpoint_name(self, name: str) -> str:
        return name.replace("gate.moe_statics.", "moe_statics.")

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        name = f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"
        return [TensorRecipe(name, (1, opts.num_experts), "F32", "zeros", layer=layer)]
