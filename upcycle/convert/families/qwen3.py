"""Qwen3: Llama with an RMSNorm over each query and key head (head_dim absent from config.json: 128)."""

from upcycle.convert.families.base import Family, Traits, layer_types_windows

FAMILY = Family(
    model_type="qwen3",
    title="Qwen3",
    example="Qwen/Qwen3-8B",
    targets=("qwen3_moe", "dots1"),
    traits=lambda c: Traits(
        qk_norm="head", qkv_bias=bool(c.get("attention_bias")), o_bias=bool(c.get("attention_bias"))
    ),
    windows=layer_types_windows,
)
