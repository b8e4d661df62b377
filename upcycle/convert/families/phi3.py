"""Phi-3: Llama-form layers that store q/k/v as one qkv_proj and gate/up as one gate_up_proj (split on the way),
and one attention window on every layer. Rotating only part of each head (Phi-4-mini) has no exact home, and
neither does LongRoPE (Phi-3-*-128k, Phi-3.5): Phi-3 generates through its own prepare_inputs_for_generation."""

from upcycle.convert.families.base import DenseModel, Family, MlpLayout, every_layer_window


def _partial_rotary(dense: DenseModel) -> str | None:
    factor = dense.resolved.get("partial_rotary_factor")
    if factor is not None and factor != 1.0:
        homes = ", ".join(dense.spec.targets)
        return (
            f"it rotates only part of each head (partial_rotary_factor {factor}), and none of its targets ({homes}) "
            "rotates part of a head the way Phi-3 does"
        )
    return None


# Rotary types whose tables depend on the sequence length: recomputing a cache past the switch changes the keys.
LENGTH_DEPENDENT_ROPE = {"longrope", "dynamic"}


def _cache_recompute(dense: DenseModel) -> str | None:
    rope = dense.rope_parameters().get("rope_type", "default")
    if rope in LENGTH_DEPENDENT_ROPE:
        return (
            f"Phi-3 drops its key/value cache when a sequence grows past original_max_position_embeddings "
            f"({dense.resolved.get('original_max_position_embeddings')}) and recomputes it with {rope} rotary's long "
            "factors; its targets keep the cache, so greedy generation differs past that point"
        )
    return None


FAMILY = Family(
    model_type="phi3",
    title="Phi-3",
    example="microsoft/Phi-3-mini-4k-instruct",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    mlp=MlpLayout(gate_up="mlp.gate_up_proj.weight"),
    fused_qkv="self_attn.qkv_proj.weight",
    windows=every_layer_window,
    refusals=(_partial_rotary, _cache_recompute),
    refused_configs=(
        "partial_rotary_factor below 1 (Phi-4-mini): no target rotates part of a head as Phi-3 does",
        "LongRoPE or dynamic rotary (Phi-3-*-128k, Phi-3.5): Phi-3 recomputes its cache past the original context, "
        "its targets do not, so generate() differs",
        "any config, on a transformers release whose Phi-3 drops its cache past the original context without "
        "recomputing it (5.17 does): the config check generates across that point and refuses",
    ),
)
