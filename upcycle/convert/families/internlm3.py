"""InternLM3: transformers runs it with the Llama classes (its own config), so it upcycles as Llama does."""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="internlm3",
    title="InternLM3",
    example="internlm/internlm3-8b-instruct",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    traits=llama_traits,
    min_transformers="5.24",
)
