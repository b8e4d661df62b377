"""Llama: the reference decoder. Mixtral holds it exactly; Qwen2-MoE when layers stay dense or with softmax-topk."""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="llama",
    title="Llama",
    example="meta-llama/Llama-3.1-8B, HuggingFaceTB/SmolLM2-135M",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    traits=llama_traits,
)
