"""CWM: Llama with windowed layers between full-attention ones (layer_types); Mixtral holds one window for all."""

from upcycle.convert.families.base import Family, layer_types_windows

FAMILY = Family(
    model_type="cwm",
    title="CWM",
    example="facebook/cwm (mixed windows: refused)",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    windows=layer_types_windows,
)
