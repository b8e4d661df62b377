"""Cohere 2 (Command R7B, Command A): attention and MLP in parallel from one LayerNorm, windows per layer, rotary
only on the windowed layers, a logit scale. Cohere2-MoE shares that decoder layer exactly."""

from upcycle.convert.families.base import Family, Traits, layer_types_windows

FAMILY = Family(
    model_type="cohere2",
    title="Cohere 2",
    example="CohereLabs/c4ai-command-r7b-12-2024",
    targets=("cohere2_moe",),
    traits=lambda c: Traits(
        block="cohere2", qkv_bias=bool(c.get("attention_bias")), o_bias=bool(c.get("attention_bias"))
    ),
    windows=layer_types_windows,
)
