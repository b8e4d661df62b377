"""Ministral 3: Mistral with an optional position-dependent query scaling (rope_parameters.llama_4_scaling_beta).

No native MoE class scales queries by position, so only configs without that scaling are exact. The scaling acts
only beyond original_max_position_embeddings: refused here by rule, and seen by the config check's far-position
probe as well.
"""

from upcycle.convert.families.base import DenseModel, Family, every_layer_window


def _query_scaling(dense: DenseModel) -> str | None:
    beta = (dense.resolved.get("rope_parameters") or {}).get("llama_4_scaling_beta")
    if beta:
        return (
            f"it scales queries by position (rope_parameters.llama_4_scaling_beta = {beta}), which no native MoE "
            "class does"
        )
    return None


def _rope(parameters: dict) -> dict:
    """A zero llama_4_scaling_beta is the identity; target classes do not know the field."""
    return {k: v for k, v in parameters.items() if k != "llama_4_scaling_beta"}


FAMILY = Family(
    model_type="ministral3",
    title="Ministral 3",
    example="mistralai/Ministral-3-8B-Base-2512 (query scaling: refused)",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    windows=every_layer_window,
    refusals=(_query_scaling,),
    rope=_rope,
)
