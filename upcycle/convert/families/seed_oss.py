"""Seed-OSS: Llama attention with q/k/v biases (attention_bias, on by default) and an optional output bias."""

from upcycle.convert.families.base import Family, Traits

FAMILY = Family(
    model_type="seed_oss",
    title="Seed-OSS",
    example="ByteDance-Seed/Seed-OSS-36B-Base",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    traits=lambda c: Traits(qkv_bias=bool(c.get("attention_bias")), o_bias=bool(c.get("attention_out_bias"))),
)
