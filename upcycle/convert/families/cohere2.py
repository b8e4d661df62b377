"""Cohere 2 (Command R7B, Command A): attention and MLP in parallel from one LayerNorm, windows per layer, rotary
only on the windowed layers, a logit scale. Cohere2-MoE shares that decoder layer exactly."""

from upcycle.convert.families.base import Family, layer_types_windows, llama_traits

FAMILY = Family(
    model_type="cohere2",
    title="Cohere 2",
    example="CohereLabs/c4ai-command-r7b-12-2024",
    targets=("cohere2_moe",),
    traits=lambda c: llama_traits(c, block="cohere2"),
    windows=layer_types_windows,
)
