"""Ministral: Mistral-style attention with a window per layer (layer_types); Mixtral holds one window for all."""

from upcycle.convert.families.base import Family, layer_types_windows

FAMILY = Family(
    model_type="ministral",
    title="Ministral",
    example="mistralai/Ministral-8B-Instruct-2410",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    windows=layer_types_windows,
)
