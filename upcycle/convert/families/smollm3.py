"""SmolLM3: Llama with rotary embeddings switched off on some layers (NoPE, every 4th by default).

No native MoE class skips the rotation per layer, so only configs that rotate on every layer are exact.
"""

from upcycle.convert.families.base import DenseModel, Family, layer_types_windows


def _nope_layers(dense: DenseModel) -> str | None:
    flags = dense.resolved.get("no_rope_layers") or []
    nope = [i for i, use_rope in enumerate(flags[: dense.num_layers]) if not use_rope]
    if nope:
        return (
            f"layers {nope} use no rotary embedding (no_rope_layers), which no native MoE class can switch off per "
            "layer"
        )
    return None


FAMILY = Family(
    model_type="smollm3",
    title="SmolLM3",
    example="HuggingFaceTB/SmolLM3-3B (NoPE layers: refused)",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    windows=layer_types_windows,
    refusals=(_nope_layers,),
)
