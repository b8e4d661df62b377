"""Hunyuan MoE: Hunyuan's decoder layer; the router always renormalises, and a shared expert always runs.

The shared expert is as wide as a routed one and cannot be switched off, so it is written as zeros: exact, at
the cost of one expert's compute per token.
"""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem
from upcycle.convert.tensor_recipe import TensorRecipe


class HunyuanMoeTarget(Target):
    name = "hunyuan_v1_moe"
    architecture = "HunYuanMoEV1ForCausalLM"
    model_type = "hunyuan_v1_moe"
    blocks = frozenset({"hunyuan"})
    qk_norms = frozenset({"head"})
    qkv_bias = True
    o_bias = True
    router_fp32 = True

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router != "renorm":
            return "Hunyuan-MoE always renormalises the top-k weights, so only the renormalised router is exact"
        if not layout.all_moe:
            return "every Hunyuan-MoE layer is sparse, so no layer can stay dense"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "num_experts": opts.num_experts,
            "moe_topk": opts.top_k,
            "attention_bias": dense.traits.qkv_bias,
        }

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.wg.weight"

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        prefix, hidden, inter = f"model.layers.{layer}.mlp.shared_mlp.", dense.hidden_size, dense.intermediate_size
        return [
            TensorRecipe(prefix + "gate_proj.weight", (inter, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "up_proj.weight", (inter, hidden), dtype, "zeros", layer=layer),
            TensorRecipe(prefix + "down_proj.weight", (hidden, inter), dtype, "zeros", layer=layer),
        ]
