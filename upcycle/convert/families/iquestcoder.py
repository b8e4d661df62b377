"""IQuest-Coder: transformers runs it with the Llama classes (its own config), so it upcycles as Llama does."""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="iquestcoder",
    title="IQuest-Coder",
    example="IQuestLab/IQuest-Coder-V1-40B-Instruct",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    traits=llama_traits,
    min_transformers="5.24",
)
