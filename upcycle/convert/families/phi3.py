"""Phi-3: Llama-form layers that store q/k/v as one qkv_proj and gate/up as one gate_up_proj (split on the way),
and one attention window on every layer. Rotating only part of each head (Phi-4-mini) has no exact home."""

from upcycle.convert.families.base import DenseModel, Family, MlpLayout, every_layer_window


def _partial_rotary(dense: DenseModel) -> str | None:
    factor = dense.resolved.get("partial_rotary_factor")
    if factor is not None and factor != 1.0:
        return f"it rotates only part of each head (partial_rotary_factor {factor}), which Mixtral cannot"
    return None


FAMILY = Family(
    model_type="phi3",
    title="Phi-3",
    example="microsoft/Phi-3-mini-4k-instruct",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    mlp=MlpLayout(gate_up="mlp.gate_up_proj.weight"),
    fused_qkv="self_attn.qkv_proj.weight",
    windows=every_layer_window,
    refusals=(_partial_rotary,),
)
