"""GraniteMoe and GraniteMoe-SWA: the Granite layers (multipliers; windows, rotary bases and sinks per layer for
SWA) with experts stored stacked. The router takes the top k logits, then a softmax over those k: the weights
always sum to 1 (renormalised router only)."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target, no_groups_problem, sibling_fields


class GraniteMoeTarget(Target):
    name = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    model_type = "granitemoe"
    moe_prefix = "block_sparse_moe"
    blocks = frozenset({"granite"})
    qkv_bias = True
    o_bias = True
    stacked_experts = True
    per_layer_windows = False

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        if opts.router != "renorm":
            return f"{self.architecture} softmaxes over the top k logits only, so only the renormalised router is exact"
        if not layout.all_moe:
            return f"every {self.architecture} layer is sparse, so no layer can stay dense"
        if dense.has_windows and not self.per_layer_windows:
            return f"{self.architecture} has no sliding-window attention, which this model uses"
        return no_groups_problem(self, opts)

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return sibling_fields(dense, self.model_type) | {
            "intermediate_size": dense.intermediate_size,
            "num_local_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "router_aux_loss_coef": 0.01,
        }

    # The hub layout, which transformers renames on load and other runtimes read as is.
    def stacked_key(self, layer: int, part: str) -> str:
        name = "input_linear" if part == "gate_up" else "output_linear"
        return f"model.layers.{layer}.block_sparse_moe.{name}.weight"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.router.layer.weight"

    def checkpoint_name(self, name: str) -> str:
        return name.replace("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")


class GraniteMoeSwaTarget(GraniteMoeTarget):
    name = "granitemoe_swa"
    architecture = "GraniteMoeSwaForCausalLM"
    model_type = "granitemoe_swa"
    blocks = frozenset({"granite_swa"})
    per_layer_windows = True

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        return super().moe_config(dense, opts, layout) | {"shared_intermediate_size": 0}

    # No renaming rule exists for this class: the names it holds in memory.
    def stacked_key(self, layer: int, part: str) -> str:
        name = "gate_up_proj" if part == "gate_up" else "down_proj"
        return f"model.layers.{layer}.block_sparse_moe.experts.{name}"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.router.weight"

    def checkpoint_name(self, name: str) -> str:
        return name
