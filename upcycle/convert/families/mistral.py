"""Mistral: Llama with one attention window on every layer (absent from config.json: the class's 4096)."""

from upcycle.convert.families.base import Family, every_layer_window

FAMILY = Family(
    model_type="mistral",
    title="Mistral",
    example="mistralai/Mistral-7B-v0.3",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    windows=every_layer_window,
)
