"""Qwen3: Llama with an RMSNorm over each query and key head (head_dim absent from config.json: 128)."""

from upcycle.convert.families.base import Family, layer_types_windows, llama_traits

FAMILY = Family(
    model_type="qwen3",
    title="Qwen3",
    example="Qwen/Qwen3-8B",
    targets=("qwen3_moe", "dots1"),
    traits=lambda c: llama_traits(c, qk_norm="head"),
    windows=layer_types_windows,
)
