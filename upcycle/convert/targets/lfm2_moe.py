"""Lfm2-MoE: LFM2's convolution and attention layers with experts after a leading run of dense layers.

Its router scores experts with a sigmoid and divides by their sum plus 1e-6, which no random router makes exact.
With a zero router every score is sigmoid(0) = 1/2; without the normalisation and with routed_scaling_factor 2/k
each of the k weights is exactly 1/k, so the MoE equals the dense MLP.
"""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem, sibling_fields
from upcycle.convert.tensor_recipe import TensorRecipe


class Lfm2MoeTarget(Target):
    name = "lfm2_moe"
    architecture = "Lfm2MoeForCausalLM"
    model_type = "lfm2_moe"
    moe_prefix = "feed_forward"
    expert_names = {"gate": "w1", "up": "w3", "down": "w2"}
    blocks = frozenset({"lfm2"})
    qk_norms = frozenset({"head"})

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router_init != "zero":
            return (
                "Lfm2-MoE divides sigmoid scores by their sum plus 1e-6, so only a zero router is exact "
                "(use --router-init zero)"
            )
        if opts.router != "renorm":
            return "Lfm2-MoE is exact here with --router renorm and a zero router"
        first = layout.moe_layers[0]
        if layout.moe_layers != tuple(range(first, layout.num_layers)):
            return "Lfm2-MoE keeps only leading layers dense (num_dense_layers); choose --layers as a range to the end"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return sibling_fields(dense, self.model_type) | {
            "intermediate_size": dense.intermediate_size,
            "moe_intermediate_size": dense.intermediate_size,
            "num_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "num_dense_layers": layout.moe_layers[0],
            "norm_topk_prob": False,
            "routed_scaling_factor": 2.0 / opts.top_k,
            "use_expert_bias": True,
            "layer_types": list(dense.resolved["layer_types"]),
        }

    def dense_mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.feed_forward.{self.expert_names[projection]}.weight"

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        name = f"model.layers.{layer}.feed_forward.expert_bias"
        return [TensorRecipe(name, (opts.num_experts,), "F32", "zeros", layer=layer)]
