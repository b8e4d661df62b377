"""FlexOlmo: OLMo 2's decoder layer (norms after each block, q/k norms over the whole projection) with experts."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem


class FlexOlmoTarget(Target):
    name = "flex_olmo"
    architecture = "FlexOlmoForCausalLM"
    model_type = "flex_olmo"
    blocks = frozenset({"olmo2"})
    qk_norms = frozenset({"projection"})
    qkv_bias = True
    o_bias = True

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if dense.has_windows:
            return "FlexOlmo has no sliding-window attention, which this model uses"
        if not layout.all_moe:
            return "every FlexOlmo layer is sparse, so no layer can stay dense"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return {
            "intermediate_size": dense.intermediate_size,
            "num_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "norm_topk_prob": opts.router == "renorm",
            "attention_bias": dense.traits.qkv_bias,
            "router_aux_loss_coef": 0.01,
        }
