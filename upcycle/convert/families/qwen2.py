"""Qwen2: Llama with q/k/v biases; windows on the layers from max_window_layers on (derived into layer_types)."""

from upcycle.convert.families.base import Family, Traits, layer_types_windows

FAMILY = Family(
    model_type="qwen2",
    title="Qwen2 / Qwen2.5",
    example="Qwen/Qwen2.5-7B",
    targets=("qwen2_moe", "glm4_moe"),
    traits=lambda c: Traits(qkv_bias=True),
    windows=layer_types_windows,
)
